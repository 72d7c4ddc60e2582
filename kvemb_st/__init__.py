"""kvemb-st: training-free sentence embeddings from frozen decoder-only LLMs (KV-Embedding) for sentence-transformers."""

from kvemb_st import attention as _attention  # noqa: F401  (registers the attention function at import)
from kvemb_st.api import from_base, load
from kvemb_st.benchmark.identity import mteb_model
from kvemb_st.config import COMPRESSION_TEMPLATE, PROMPTEOL_TEMPLATE, ConfigError, KVEmbeddingConfig
from kvemb_st.module import KVEmbedding
from kvemb_st.postprocessing import PostProcessing
from kvemb_st.postprocessing_fit import add_postprocessing, fit_postprocessing
from kvemb_st.version import __version__

__all__ = [
    "COMPRESSION_TEMPLATE",
    "PROMPTEOL_TEMPLATE",
    "ConfigError",
    "KVEmbedding",
    "KVEmbeddingConfig",
    "PostProcessing",
    "__version__",
    "add_postprocessing",
    "fit_postprocessing",
    "from_base",
    "load",
    "mteb_model",
]
