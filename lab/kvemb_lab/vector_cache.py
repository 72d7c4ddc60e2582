"""Raw vectors cached on disk, so every text is embedded once per (model, side) and raw and whitened scores share it.

The MTEB table scores each method twice, without post-processing and with whitening. The whitened vector of a
text is its raw vector through the model's own :class:`~kvemb_st.postprocessing.PostProcessing` transform for the
side the call reached, so one forward pass serves both rows; and since each embedded chunk is committed at once,
a stopped run resumes with everything it had embedded. Methods that differ only in their readout (``mean`` and
``last``: the same plain forward) share a forward pass too: the encode of one fills the other's cache
(:func:`forward_signature`). A cache file belongs to one raw model (its content
revision; the file name also carries the model's name, for people); a row is the side (the embedding module's own
``side_for``, plus any extra prompt) and the sha256 of the text.

Two runs of the same task can share one long job (two cores, one Imdb): texts are embedded longest first, or
shortest first for the second run, and each chunk asks the cache again first, so the runs skip what the other
embedded meanwhile and meet in the middle.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers.base.modules import Router

from kvemb_st.api import KVSentenceTransformer
from kvemb_st.benchmark.identity import content_revision
from kvemb_st.config import KVEmbeddingConfig
from kvemb_st.methods import get_method
from kvemb_st.postprocessing import PostProcessing
from kvemb_st.side import READOUT_KEYS
from kvemb_st.side_router import route_of

DEFAULT_CHUNK = 128  # texts embedded between two commits: what a stopped run can lose
# ST's encode arguments the cached encode honours only at these values (mteb and add_postprocessing use them).
FIXED_ARGUMENTS = {
    "output_value": "sentence_embedding", "precision": "float32", "device": None, "truncate_dim": None,
    "pool": None, "chunk_size": None,
}  # fmt: skip
# Config keys that never change the forward pass: the readout knobs, and what only names or describes the config.
FORWARD_FREE_KEYS = ("method", "kvemb_st_version", "layer_selection", *READOUT_KEYS)


def post_module(model: Any, side: str | None) -> PostProcessing | None:
    """The post-processing the model's last module applies to ``side``'s vectors (a Router: that side's route)."""
    last = model[-1]
    if isinstance(last, Router):
        return route_of(last, side)
    return last if isinstance(last, PostProcessing) else None


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class VectorCache:
    """One sqlite file of float32 vectors keyed by (side, sha256 of the text); every write is committed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS vectors (side TEXT, text TEXT, vector BLOB, PRIMARY KEY (side, text))"
        )
        self._db.commit()

    def get(self, side: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):  # sqlite's limit on bound parameters
            part = unique[start : start + 500]
            marks = ",".join("?" * len(part))
            query = f"SELECT text, vector FROM vectors WHERE side = ? AND text IN ({marks})"
            rows = self._db.execute(query, [side, *part])
            found.update((key, np.frombuffer(blob, dtype=np.float32)) for key, blob in rows)
        return found

    def put(self, side: str, keys: Sequence[str], vectors: np.ndarray) -> None:
        rows = [(side, key, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for key, v in zip(keys, vectors)]
        self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)", rows)
        self._db.commit()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0])

    def close(self) -> None:
        self._db.close()


@dataclass
class CacheCounts:
    """Texts served from the cache and texts embedded by a forward pass, since the encode was installed."""

    cached: int = 0
    embedded: int = 0


def raw_model(model: Any) -> KVSentenceTransformer:
    """The model's embedding module alone (no post-processing): the pipeline whose vectors are cached."""
    return KVSentenceTransformer(
        modules=[model[0]], prompts=dict(model.prompts), default_prompt_name=model.default_prompt_name,
        similarity_fn_name="cosine", device=str(model.device),
    )  # fmt: skip


def cache_path(raw: Any, cache_dir: str | Path) -> Path:
    """``<name>-<content revision>.sqlite``; the revision alone identifies the raw model (it hashes the configs, base
    model included), so a file of another name with the same revision is the same vectors: two builds that differ
    only in their post-processing (another calibration set, say) share one pass of embedding."""
    revision = content_revision(raw)
    existing = sorted(Path(cache_dir).glob(f"*-{revision}.sqlite"))
    name = str(raw.model_card_data.model_name or "model").replace("/", "--")
    return existing[0] if existing else Path(cache_dir) / f"{name}-{revision}.sqlite"


def forward_signature(config: KVEmbeddingConfig) -> str:
    """What decides the hidden states of an embedding module of this config: the config without the readout knobs
    (top level and per side) and the method's forward (its class, its copies of the text). Two models of one
    signature run the same forward pass on every text, so each one's vectors are a readout of the other's states
    (loaded the same way: like the cache file's name, the signature does not see a dtype passed at load time). A
    config is enough, so a runner can tell which models share a forward before loading any weights."""
    method = get_method(config.method)
    values = config.to_dict()
    kept = {key: value for key, value in values.items() if key not in FORWARD_FREE_KEYS}
    sides = {name: {k: v for k, v in over.items() if k not in READOUT_KEYS} for name, over in values["sides"].items()}
    kept["sides"] = {name: over for name, over in sides.items() if over}
    kept["forward"] = [type(method).__name__, method.copies]
    return json.dumps(kept, sort_keys=True, default=str)


@dataclass
class Sibling:
    """A model read out of another's forward pass: its config (the readout per side) and its own cache file."""

    config: KVEmbeddingConfig
    cache: VectorCache

    def vectors(self, side: str | None, items: Sequence[dict[str, Any]]) -> np.ndarray:
        """Its unit vectors from the per-text outputs of the other model's forward (``encode(output_value=None)``)."""
        readout = self.config.readout(side)
        pooled = [readout.pool(item["token_embeddings"][None], item["attention_mask"][None])[0] for item in items]
        return F.normalize(torch.stack(pooled), dim=-1).cpu().numpy()


def sibling(model: Any, other: Any, cache_dir: str | Path) -> Sibling:
    """``other`` as a :class:`Sibling` of ``model``; a clear error where its vectors need another forward pass."""
    config = other[0].config
    if forward_signature(config) != forward_signature(model[0].config):
        raise ValueError(
            f"method {config.method!r} runs another forward pass than {model[0].config.method!r} (template, layers or "
            "method differ), so its vectors cannot be read out of it: cache it on its own"
        )
    sides = [config.side(name) for name in (None, *config.sides)]
    if any(s.pool_layers is not None or s.pool_span != "all" or s.long_inputs != "truncate" for s in sides):
        raise ValueError(
            f"method {config.method!r} pools intermediate layers, averages the text's own tokens or chunks long "
            "inputs; a sibling is read out of the final hidden states of all tokens of one input: cache it on its own"
        )
    return Sibling(config, VectorCache(cache_path(raw_model(other), cache_dir)))


class CachedEncode:
    """Replaces ``model.encode`` (so ``encode_query``/``encode_document`` go through it too): raw vectors come from
    the cache or one forward pass of the embedding module, then the model's PostProcessing (if it has one now) is
    applied for the call's side, as its ``forward`` would. The cache file is found by the raw pipeline's content
    revision (post-processing left out, see :func:`cache_path`), so a changed knob or base model never reads another's
    vectors. ``siblings``: models of the same forward pass (:func:`sibling`) whose caches get their vectors of every
    text embedded here, from the same forward pass. ``shortest_first``: the order for a second run beside a first
    (module docstring)."""

    def __init__(
        self, model: Any, cache_dir: str | Path, chunk: int = DEFAULT_CHUNK, siblings: Sequence[Any] = (),
        shortest_first: bool = False,
    ) -> None:
        config = getattr(model[0], "config", None)
        sides = {name or "default": config.side(name) for name in (None, *config.sides)} if config is not None else {}
        after = [name for name, side in sides.items() if side.long_inputs == "chunk" and side.chunk_combine == "after"]
        if after:
            raise ValueError(
                f"side(s) {after} combine their chunk vectors after the post-processing, which needs every chunk's "
                "vector; the cache holds one raw vector per text, so it cannot serve this model: run it uncached"
            )
        self.model, self.chunk, self.shortest_first = model, chunk, shortest_first
        self.raw = raw_model(model)
        self.siblings = [sibling(model, other, cache_dir) for other in siblings]  # refused before any file is made
        self.cache = VectorCache(cache_path(self.raw, cache_dir))
        self.counts = CacheCounts()
        model.encode = self  # an instance attribute: ST's encode_query/encode_document call self.encode

    def side_key(self, prompt: str | None, task: str | None) -> tuple[str | None, str]:
        """The side the embedding module will use and the cache's name for it (an extra prompt text is part of it)."""
        side, extra = self.model[0].side_for(prompt, task)
        return side, (side or "default") + (f"+prompt:{text_key(extra)[:16]}" if extra else "")

    def __call__(
        self,
        inputs: str | Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool = False,
        task: str | None = None,
        **fixed: Any,
    ) -> np.ndarray | torch.Tensor:
        for name, value in fixed.items():
            if name not in FIXED_ARGUMENTS or value != FIXED_ARGUMENTS[name]:
                raise ValueError(f"the cached encode does not support {name}={value!r} (supported: {FIXED_ARGUMENTS})")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if prompt is None:
            name = prompt_name if prompt_name is not None else self.model.default_prompt_name
            if name is not None and name not in self.model.prompts:
                known = sorted(self.model.prompts)
                raise ValueError(f"prompt name {name!r} is not one of the model's prompts {known}")
            prompt = self.model.prompts.get(name) if name is not None else None
        side, key = self.side_key(prompt, task)
        keys = [text_key(text) for text in texts]
        found = self.cache.get(key, keys)
        by_key = dict(zip(keys, texts))
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        missing.sort(key=lambda k: len(by_key[k]), reverse=not self.shortest_first)  # stable: ties keep their order
        self.counts.cached += len(texts) - len(missing)
        for start in range(0, len(missing), self.chunk):
            part = missing[start : start + self.chunk]
            meanwhile = self.cache.get(key, part)  # embedded by another run of the same task since this call began
            found.update(meanwhile)
            self.counts.cached += len(meanwhile)
            part = [k for k in part if k not in meanwhile]
            if not part:
                continue
            batch = [by_key[k] for k in part]
            vectors = self.embed(batch, part, side, key, prompt, task, batch_size, show_progress_bar)
            self.cache.put(key, part, vectors)
            found.update(zip(part, np.asarray(vectors, dtype=np.float32)))
            self.counts.embedded += len(part)
        empty = np.zeros((0, self.raw.get_embedding_dimension()), np.float32)
        raw = np.stack([found[k] for k in keys]) if keys else empty
        post = post_module(self.model, side)
        vectors = post.transform(raw) if post is not None else raw
        if normalize_embeddings:
            vectors = F.normalize(torch.from_numpy(vectors), dim=-1).numpy()
        result: np.ndarray | torch.Tensor = torch.from_numpy(vectors) if convert_to_tensor else vectors
        return result[0] if isinstance(inputs, str) else result

    def embed(
        self, texts: list[str], keys: list[str], side: str | None, key: str, prompt: str | None, task: str | None,
        batch_size: int, show_progress_bar: bool | None,
    ) -> np.ndarray:
        """The raw vectors of ``texts`` by one forward pass; each sibling's vectors of them go to its cache."""
        options = dict(prompt=prompt, task=task, batch_size=batch_size, show_progress_bar=bool(show_progress_bar))
        if not self.siblings:
            return self.raw.encode(texts, convert_to_numpy=True, **options)
        items = self.raw.encode(texts, output_value=None, **options)
        for other in self.siblings:
            other.cache.put(key, keys, other.vectors(side, items))
        return torch.stack([item["sentence_embedding"] for item in items]).cpu().numpy()

    def close(self) -> None:
        for cache in (self.cache, *(other.cache for other in self.siblings)):
            cache.close()
