"""A base model that is neither cached nor reachable gives one clear error, before any module is built."""

from __future__ import annotations

import os
import subprocess
import sys


def test_missing_base_offline_names_id_revision_and_remedy(tiny_llama, tmp_path):
    import kvemb_st

    model = kvemb_st.from_base(tiny_llama, layers=[1])
    model[0].config.base_model = "some-org/not-cached-model"
    model[0].config.base_revision = "v1.2"
    model.save(str(tmp_path / "saved"))
    script = f"""
import kvemb_st
from kvemb_st.backbone import BaseModelUnavailableError
try:
    kvemb_st.load({str(tmp_path / "saved")!r})
except BaseModelUnavailableError as err:
    print("ERROR:", err)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-home")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert "ERROR: cannot load base model 'some-org/not-cached-model' (revision v1.2)" in out, result.stderr[-2000:]
    assert "hf download some-org/not-cached-model --revision v1.2" in out
    assert "local folder or .gguf file" in out
