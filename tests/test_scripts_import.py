"""Every command-line script of the repository (experiments, tools, examples) imports: a script whose import broke
when the code under it moved fails here, not in the middle of a long run. Imported, not run (no ``__main__``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for pattern in ("experiments/*/*.py", "tools/*.py", "examples/*.py") for p in ROOT.glob(pattern))


def test_the_scripts_are_found():
    assert len(SCRIPTS) >= 15 and ROOT / "experiments/mteb/run_table.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_imports(script, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"_script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while it is defined
    spec.loader.exec_module(module)  # runs its imports and definitions; its main() stays behind __name__
