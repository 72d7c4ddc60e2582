"""tools/backend_check.py (the Python part of ``tools/gpu_check.sh run``) as its CPU dry run: every backend is
forced, every case reported, the fast paths that ran agree with float64 math, and the tables are written."""

from __future__ import annotations

import json

from kvemb_lab import backend_check


def test_dry_run_forces_every_backend_and_writes_the_tables(tmp_path):
    assert backend_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "backend_check.json").read_text())
    assert result["environment"]["torch"] and result["dtype"] == "bf16"
    kernel, model = result["kernel"], result["model"]
    # 2 head dims x GQA/MHA x mask/causal, each under SDPA's own choice and every forced backend
    assert len(kernel) == 2 * 2 * 2 * (1 + len(backend_check.BACKENDS))
    assert {row["head_dim"] for row in kernel} == {12, 128} and {row["mask"] for row in kernel} == {"mask", "causal"}
    flash = [row for row in kernel if row["forced"] == "FLASH_ATTENTION"]
    assert all(row["path"] == "lse op" and row["ok"] for row in flash)  # CPU flash: the real op, checked vs float64
    assert all(row["path"] == "not available" for row in kernel if row["forced"] == "CUDNN_ATTENTION")  # no GPU
    assert len(model) == 2 * 2 * len(backend_check.BACKENDS) and all(row["ok"] for row in model)
    assert all(row["path"].startswith("lse_merge") for row in model if row["forced"].startswith("FLASH"))
    table = (tmp_path / "backend_check.md").read_text()
    assert "cuDNN" in table and "| 128 | 4/2 | mask | none (SDPA's choice) | FLASH_ATTENTION | lse op |" in table
