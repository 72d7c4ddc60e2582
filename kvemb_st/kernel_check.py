"""Which attention path each kernel combination may take: the verdicts of the self-check, per process.

A kernel whose log-sum-exp follows another convention than the one the merge assumes (base 2, other padding,
another layout) does not crash: it gives plausible, wrong vectors. So the first time a re-routed layer runs a
:class:`Combination`, :mod:`kvemb_st.attention` compares its fast result with the portable path on a few rows
and records the verdict here; a mismatch or an exception sends that combination to the portable path for the
rest of the process, with one warning. The verdicts are shared by every model and thread of the process.

``KVEMB_SELF_CHECK=0`` skips the check (benchmarks of the bare kernel path); the fast path then runs unchecked.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENV = "KVEMB_SELF_CHECK"
# Largest allowed ``max |fast - portable| / max |portable|`` on the checked rows. The two paths round differently
# (the portable one carries the prefix logit in the input dtype). Measured on CPU, SmolLM2 layers 20-29, padded
# batch, mask dropped and kept: float32 7e-7, bfloat16 1.0e-2, float16 1.1e-3; the same with a base-2 LSE: 0.75.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


@dataclass(frozen=True)
class Combination:
    """What decides whether a kernel's output and log-sum-exp can be trusted: one self-check each."""

    device: str
    backend: str
    dtype: str
    head_dim: int
    heads: int
    kv_heads: int
    mask: str  # "mask", "causal" or "full" (neither)

    def __str__(self) -> str:
        return (
            f"{self.device} {self.backend} {self.dtype.removeprefix('torch.')} head_dim={self.head_dim} "
            f"heads={self.heads}/{self.kv_heads} {self.mask}"
        )


@dataclass(frozen=True)
class Verdict:
    """``fast``: whether the log-sum-exp merge runs; ``error``: the measured difference, or what went wrong."""

    fast: bool
    error: str

    @property
    def path(self) -> str:
        return "lse_merge" if self.fast else "prefix_channel"


_verdicts: dict[Combination, Verdict] = {}
_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def verdict(combination: Combination) -> Verdict | None:
    return _verdicts.get(combination)


def decide(combination: Combination, check: Callable[[], float], tolerance: float) -> bool:
    """Run ``check`` (the relative difference of the two paths) once for ``combination``; whether the fast path may run.

    Under a lock, so that concurrent first calls wait for one check instead of each running their own.
    """
    with _lock:
        known = _verdicts.get(combination)
        if known is not None:
            return known.fast
        try:
            difference = check()
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure of a private op means: do not use it
            return _record_failure(combination, f"{type(error).__name__}: {error}")
        if not difference <= tolerance:  # also NaN
            return _record_failure(
                combination, f"output differs from the portable path by {difference:.3g} (relative), over {tolerance:g}"
            )
        _verdicts[combination] = Verdict(True, f"{difference:.1e}")
        return True


def fail(combination: Combination, error: BaseException) -> None:
    """The fast path raised after its check passed (e.g. at another length): portable from now on, one warning."""
    with _lock:
        if _verdicts.get(combination, Verdict(True, "")).fast:
            _record_failure(combination, f"{type(error).__name__}: {error}")


def _record_failure(combination: Combination, error: str) -> bool:
    _verdicts[combination] = Verdict(False, error)
    hip = f", ROCm {torch.version.hip}" if torch.version.hip else ""
    warnings.warn(
        f"kvemb_st: the {combination.backend} kernel's log-sum-exp path failed its self-check on "
        f"{combination} (torch {torch.__version__}{hip}): {error}. Re-routed layers with these settings use the "
        "portable prefix-channel path from now on (the same vectors, somewhat slower). Please report this line.",
        RuntimeWarning,
        stacklevel=4,
    )
    return False


def results() -> dict[Combination, Verdict]:
    """Every combination checked so far in this process and its verdict (what ``tools/bench.py`` prints)."""
    with _lock:
        return dict(_verdicts)


def summary() -> str:
    """One line per checked combination: which path ran and why."""
    if not enabled():
        return f"attention self-check off ({ENV}=0): the log-sum-exp merge ran unchecked wherever a kernel had one"
    why = {True: "checked, difference ", False: "self-check failed: "}
    lines = [f"{c}: {v.path} ({why[v.fast]}{v.error})" for c, v in results().items()]
    return "\n".join(lines) or "no re-routed layer ran a kernel with a log-sum-exp op (prefix-channel path only)"


def reset() -> None:
    """Forget every verdict (tests that swap kernels; a process otherwise keeps them)."""
    with _lock:
        _verdicts.clear()
