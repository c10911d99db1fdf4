"""The package's layers: the import-linter contracts of pyproject.toml ([tool.importlinter]) hold, and they catch a
break (the runtime reaching into the exporters, and through them torch).

lint-imports runs as a command (the script next to this interpreter), from the folder whose ``edgevlm`` it checks:
it puts its working directory first on sys.path. ``--no-cache``: no .import_linter_cache left in the tree.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:                # Python 3.10: import-linter itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent))


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def _lint(cwd: Path, **env) -> subprocess.CompletedProcess:
    if LINT is None:
        pytest.skip("import-linter is not installed next to this Python (pip install -e '.[test]')")
    # COLUMNS: rich would wrap long contract names at 80 columns.
    env = {**os.environ, "COLUMNS": "200", "PYTHONIOENCODING": "utf-8", **env}
    return subprocess.run([LINT, "--no-cache", "--config", "pyproject.toml"], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=120)


def test_contracts_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for contract in _contracts().values():
        assert f"{contract['name']} KEPT" in out, out


def _python_only(folder: str, names: list[str]) -> list[str]:
    return [n for n in names
            if n == "__pycache__" or not (n.endswith(".py") or os.path.isdir(os.path.join(folder, n)))]


def test_a_runtime_import_of_an_exporter_is_caught(tmp_path):
    shutil.copytree(ROOT / "edgevlm", tmp_path / "edgevlm", ignore=_python_only)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    backends = tmp_path / "edgevlm" / "runtime" / "backends.py"
    with backends.open("a", encoding="utf-8") as f:
        f.write("\nimport edgevlm.exporters.onnx  # a deliberate layer violation\n")

    r = _lint(tmp_path, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "edgevlm.runtime.backends -> edgevlm.exporters.onnx" in out, out
    contracts = _contracts()
    assert f"{contracts['runtime']['name']} BROKEN" in out, out         # the torch-free runtime contract
    assert f"{contracts['layers']['name']} BROKEN" in out, out          # runtime sits below the exporters
    assert f"{contracts['evaluation']['name']} KEPT" in out, out        # an unrelated contract stays kept
