"""Presets ship inside the wheel: a non-editable install finds them."""

import subprocess
import sys
import zipfile

import pytest


@pytest.mark.mechanics
def test_wheel_contains_presets_and_py_typed(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(root)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("kvtools-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {p.name for p in (root / "configs").glob("*.yaml")}
    assert presets and {f"kvtools/configs/{p}" for p in presets} <= names
    assert "kvtools/py.typed" in names
    patterns = {p.name for p in (root / "configs" / "duo").glob("*.tsv")}
    assert {f"kvtools/configs/duo/{p}" for p in patterns} <= names
    modules = {p.relative_to(root).as_posix() for p in (root / "kvtools").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
