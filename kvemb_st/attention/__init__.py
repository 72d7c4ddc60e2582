"""The KV re-routing attention, plugged into transformers through ``AttentionInterface``.

At a selected layer the key and value of each row's final real token -- computed by that layer in the
same forward pass -- are prepended as one extra "prefix" slot, so that every query (including the early
tokens that causal attention keeps blind to the rest of the text) can attend to a summary of the whole
sequence. Everything that changes per call travels in a :class:`~kvemb_st.attention.routing.KVRouting` object passed as the
``kv_routing`` keyword of the model call; transformers forwards it untouched to this function. There is
no global mutable state, so models with different settings can share a process and its threads.

Non-selected layers (and calls without ``kv_routing``) go straight to transformers' SDPA attention,
keeping its fast path. Selected layers run the fused kernel that SDPA itself would pick for the layer
(``_fused_sdp_choice``), through the private op of that kernel that also returns the log-sum-exp, and merge
the prefix slot in afterwards, exactly (:func:`~kvemb_st.attention.prefix.merge_prefix`). Where the chosen kernel returns no
log-sum-exp (the math backend, an unknown device) they fall back to one public SDPA call with the prefix
logit on extra head channels. The first call of each kernel combination checks the merge against that portable
path (:func:`~kvemb_st.attention.self_check.checked_attention_with_lse`, :mod:`kvemb_st.kernel_check`): a private op with another convention,
or one that raises, can never give wrong vectors.

Modules: :mod:`~kvemb_st.attention.routing` (what a call carries), :mod:`~kvemb_st.attention.prefix` (the prefix
slot, its logit and the exact merge), :mod:`~kvemb_st.attention.kernels` (SDPA's own kernels with their
log-sum-exp), :mod:`~kvemb_st.attention.fallback` (the portable path), :mod:`~kvemb_st.attention.self_check` (the
first-call check of the fast path) and :mod:`~kvemb_st.attention.reroute` (the attention function and its
registration, done on import).
"""

from __future__ import annotations

from kvemb_st.attention.reroute import ATTN_IMPLEMENTATION, register

register()  # idempotent; importing kvemb_st is enough to use the attention

__all__ = ["ATTN_IMPLEMENTATION", "register"]
