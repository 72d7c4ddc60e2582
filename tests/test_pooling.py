"""Pooling against hand-written loops: mean and last over real tokens only, and the mean+last mix with
its weights the right way round (the last token gets ``last_weight``)."""

from __future__ import annotations

import pytest
import torch

import kvemb_st
from kvemb_st.pooling import pool

LAST_WEIGHT = 0.2  # far from 0.5, so that swapping the two weights changes the vector a lot


def hand_pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, last_weight: float) -> torch.Tensor:
    """Row by row, over the positions whose mask is 1; the mix uses the two unit vectors."""
    rows = []
    for states, keep in zip(hidden.double(), mask):
        real = [t for t in range(len(keep)) if keep[t] == 1]
        mean = sum(states[t] for t in real) / len(real)
        last = states[real[-1]]
        if mode == "mean":
            rows.append(mean)
        elif mode == "last":
            rows.append(last)
        else:
            rows.append((1 - last_weight) * mean / mean.norm() + last_weight * last / last.norm())
    return torch.stack(rows).float()


@pytest.fixture
def padded() -> tuple[torch.Tensor, torch.Tensor]:
    """Random states whose padded positions hold huge values, so any leak of padding shows."""
    torch.manual_seed(0)
    hidden = torch.randn(4, 7, 16)
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1],  # no padding
            [1, 1, 1, 0, 0, 0, 0],  # right padding
            [0, 0, 0, 0, 1, 1, 1],  # left padding
            [1, 0, 0, 0, 0, 0, 0],  # a single token
        ]
    )
    hidden[mask == 0] = 1e4
    hidden[:, :, 0] += 5.0 * torch.arange(7)  # the last token's norm differs from the mean's, as in an LLM
    return hidden, mask


@pytest.mark.parametrize("mode", ["mean", "last", "mean+last"])
def test_pool_matches_hand_written_pooling_with_padding(padded, mode):
    hidden, mask = padded
    torch.testing.assert_close(pool(hidden, mask, mode, LAST_WEIGHT), hand_pool(hidden, mask, mode, LAST_WEIGHT))


def test_mean_plus_last_gives_last_weight_to_the_last_token(padded):
    hidden, mask = padded
    mixed = pool(hidden, mask, "mean+last", LAST_WEIGHT)
    swapped = hand_pool(hidden, mask, "mean+last", 1 - LAST_WEIGHT)
    assert not torch.allclose(mixed, swapped, atol=1e-2)  # the reference above would catch a swap
    for weight, only in ((0.0, "mean"), (1.0, "last")):  # the ends are the plain poolings, normalised
        expected = torch.nn.functional.normalize(pool(hidden, mask, only), dim=-1)
        torch.testing.assert_close(pool(hidden, mask, "mean+last", weight), expected)


@pytest.mark.parametrize("pooling", ["mean", "last", "mean+last"])
def test_the_module_pools_its_own_hidden_states_like_the_hand_written_loop(tiny_llama, pooling):
    """End to end: ST returns the token states and mask of a padded batch next to the sentence vector."""
    model = kvemb_st.from_base(tiny_llama, "1-2", pooling=pooling, last_weight=LAST_WEIGHT)
    texts = ["short", "a somewhat longer sentence with quite a few more tokens in it", "medium length text"]
    outputs = model.encode(texts, output_value=None)
    hidden = torch.stack([out["token_embeddings"] for out in outputs])
    mask = torch.stack([out["attention_mask"] for out in outputs])
    assert (mask == 0).any()  # the batch really is padded
    expected = torch.nn.functional.normalize(hand_pool(hidden, mask, pooling, LAST_WEIGHT), dim=-1)
    torch.testing.assert_close(torch.stack([out["sentence_embedding"] for out in outputs]), expected)
