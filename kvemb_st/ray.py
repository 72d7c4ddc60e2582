"""Distributed batch embedding on Ray Data: one model per actor, a text column in, a vector column out.

The same code runs on a laptop (``ray.init()``) and on a cluster (``ray.init(address="auto")``): the
actors only need the saved KV-Embedding folder (a few JSON files) and the base model it names to be
reachable from every node, e.g. a shared path or a Hub id in ``kvemb_config.json``.

Install with ``pip install 'kvemb-st[ray]'``.
"""

from __future__ import annotations

from typing import Any

try:
    import pyarrow as pa
    import ray.data
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("kvemb_st.ray needs Ray Data and pyarrow: pip install 'kvemb-st[ray]'") from err

import torch

from kvemb_st.api import load

TEXT_COLUMN = "text"
VECTOR_COLUMN = "embedding"


class Embedder:
    """Callable class for :meth:`ray.data.Dataset.map_batches` (``batch_format="pyarrow"``).

    Ray builds one instance per actor, so the model is loaded once per actor, not once per batch.
    Every input column is passed through unchanged (ids stay attached to their rows) and a
    ``vector_column`` of fixed-size float32 lists is appended: a plain Parquet type that pandas,
    Polars, DuckDB or Arrow read without Ray.

    Args:
        model: Saved KV-Embedding folder or Hub repo, loaded with :func:`kvemb_st.load`.
        text_column: Column holding the texts (strings, no nulls).
        vector_column: Name of the new column; must not exist yet.
        prompt_name: ST prompt to use, e.g. ``"document"`` or ``"query"``; ``None`` for the model's template.
        encode_batch_size: Texts per forward pass inside one Ray batch.
        num_threads: torch threads of this actor; match the CPUs the actor was given.
        device, model_kwargs: As in :func:`kvemb_st.load` (e.g. ``device="cuda"``, ``{"dtype": torch.bfloat16}``).
    """

    def __init__(
        self,
        model: str,
        *,
        text_column: str = TEXT_COLUMN,
        vector_column: str = VECTOR_COLUMN,
        prompt_name: str | None = None,
        encode_batch_size: int = 32,
        num_threads: int | None = None,
        device: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.model = load(model, device=device, model_kwargs=model_kwargs)
        if prompt_name is not None and prompt_name not in self.model.prompts:
            raise ValueError(
                f"prompt_name {prompt_name!r} is not a prompt of model '{model}'; it has {sorted(self.model.prompts)}"
            )
        self.text_column = text_column
        self.vector_column = vector_column
        self.prompt_name = prompt_name
        self.encode_batch_size = encode_batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch.column_names, self.text_column, self.vector_column)
        texts = batch.column(self.text_column)
        if texts.null_count:
            raise ValueError(
                f"column {self.text_column!r} has {texts.null_count} null value(s) in this batch; "
                "fill or drop them before embedding"
            )
        vectors = self.model.encode(
            texts.to_pylist(),
            prompt_name=self.prompt_name,
            batch_size=self.encode_batch_size,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        flat = pa.array(vectors.astype("float32", copy=False).reshape(-1), type=pa.float32())  # (0,) for no rows
        dimension = self.model.get_embedding_dimension()
        return batch.append_column(self.vector_column, pa.FixedSizeListArray.from_arrays(flat, dimension))


def check_columns(columns: list[str], text_column: str, vector_column: str) -> None:
    """Fail before any work is scheduled (and inside each actor) with the columns that do exist."""
    if text_column not in columns:
        raise ValueError(f"text column {text_column!r} not found; the data has columns {columns}: pass text_column=")
    if vector_column in columns:
        raise ValueError(f"column {vector_column!r} already exists in the data; pass another vector_column=")


def embed_dataset(
    dataset: ray.data.Dataset,
    model: str,
    *,
    text_column: str = TEXT_COLUMN,
    vector_column: str = VECTOR_COLUMN,
    num_actors: int = 1,
    cpus_per_actor: float = 1,
    gpus_per_actor: float = 0,
    batch_size: int = 256,
    **embedder_kwargs: Any,
) -> ray.data.Dataset:
    """Lazily add an embedding column to ``dataset`` with a fixed pool of ``num_actors`` :class:`Embedder` actors.

    ``batch_size`` is the number of rows Ray hands one actor call; ``embedder_kwargs`` go to
    :class:`Embedder`. Row order is kept only if ``DataContext.get_current().execution_options.preserve_order``
    is set (``tools/embed_ray.py`` sets it); the other columns always stay attached to their vectors.
    """
    if num_actors < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    if cpus_per_actor <= 0:
        raise ValueError(f"cpus_per_actor must be > 0, got {cpus_per_actor}")
    check_columns(dataset.columns(), text_column, vector_column)
    embedder_kwargs.setdefault("num_threads", max(1, int(cpus_per_actor)))
    return dataset.map_batches(
        Embedder,
        fn_constructor_args=(model,),
        fn_constructor_kwargs={"text_column": text_column, "vector_column": vector_column, **embedder_kwargs},
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
    )
