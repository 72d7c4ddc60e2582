"""Every readout of every layer from one forward pass per text: the harness's way to sweep pooling levers.

A :class:`ProbeVectors` holds, for each text and each hidden-state index (``i + 1`` = output of decoder layer
``i``; the last index is the final, normed output), the mean over all real tokens, the mean over the text's
own tokens and the last token's state. Any :class:`~kvemb_st.pooling.Readout` -- pooling, layer or mean of
layers, token span -- is then a cheap combination of those, equal to what a model built with the readout
returns (the mean of layers commutes with the mean over tokens and with picking the last token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from kvemb_st.pooling import Readout, last_pool, mean_pool

KINDS = ("mean_all", "mean_text", "last")


@dataclass
class ProbeVectors:
    """``arrays[kind]`` is ``(texts, layers, hidden)`` float32; ``layers`` = number of decoder layers."""

    texts: list[str]
    arrays: dict[str, np.ndarray]

    @property
    def layers(self) -> int:
        return self.arrays["last"].shape[1]

    def vectors(self, readout: Readout) -> np.ndarray:
        """``(texts, hidden)`` unit vectors of ``readout``."""
        chosen = list(readout.layers) if readout.layers is not None else [self.layers - 1]
        readout.check_fits(self.layers)
        mean = self.arrays["mean_text" if readout.span == "text" else "mean_all"][:, chosen].mean(1)
        last = self.arrays["last"][:, chosen].mean(1)
        mean, last = torch.from_numpy(mean), torch.from_numpy(last)
        if readout.pooling == "mean":
            out = mean
        elif readout.pooling == "last":
            out = last
        else:
            out = (1 - readout.last_weight) * F.normalize(mean, dim=-1) + readout.last_weight * F.normalize(last, dim=-1)
        return F.normalize(out, dim=-1).numpy()

    def table(self, readout: Readout) -> dict[str, np.ndarray]:
        return dict(zip(self.texts, self.vectors(readout)))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, texts=np.array(self.texts, dtype=object), **self.arrays)

    @classmethod
    def load(cls, path: str | Path) -> ProbeVectors:
        with np.load(path, allow_pickle=True) as data:  # our own cache files only
            return cls([str(t) for t in data["texts"]], {kind: data[kind] for kind in KINDS})


@torch.inference_mode()
def probe(model: SentenceTransformer, texts: Sequence[str], role: str = "text", batch_size: int = 16) -> ProbeVectors:
    """Run ``model``'s first module on the distinct ``texts`` as ``role`` (``text``, ``query``, ``document``:
    the side ST's ``encode``/``encode_query``/``encode_document`` would use) and keep every layer's readouts."""
    module = model[0]
    unique = list(dict.fromkeys(texts))
    task = None if role == "text" else role
    num_layers = module.auto_model.config.num_hidden_layers
    indices = list(range(1, num_layers + 1))
    order = sorted(range(len(unique)), key=lambda i: -len(unique[i]))
    arrays = {kind: np.zeros((len(unique), num_layers, module.get_embedding_dimension()), np.float32) for kind in KINDS}
    device = next(module.auto_model.parameters()).device
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        features = module.preprocess([unique[i] for i in rows], task=task, text_mask=True)
        features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        hidden = module.run(features, indices)
        mask, text = features["attention_mask"], features["text_mask"]
        for k, index in enumerate(indices):
            states = hidden.layers[index]
            arrays["mean_all"][rows, k] = mean_pool(states, mask).cpu().numpy()
            arrays["mean_text"][rows, k] = mean_pool(states, text).cpu().numpy()
            arrays["last"][rows, k] = last_pool(states, mask).cpu().numpy()
    return ProbeVectors(unique, arrays)
