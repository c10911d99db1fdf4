"""README's quick-start commands stay true: the main job runs, and CI runs the test command."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def block(marker: str) -> str:
    m = re.search(rf"<!-- {marker} -->\s*```\s*\n(.*?)\n```\s*<!-- /{marker} -->", README, re.S)
    assert m, f"README.md has no {marker} block"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command():
    assert "test-command" in (ROOT / ".ci" / "run").read_text()
    cmd = block("test-command")
    assert "pip install" in cmd and "pytest" in cmd


@pytest.mark.slow
def test_main_command_works(tmp_path):
    """The main job, without its install steps (this environment is that install)."""
    steps = [s.strip() for s in block("main-command").split("&&")]
    install = ("python3 -m venv", ". .venv/bin/activate", "pip install")
    run = [s for s in steps if not s.startswith(install)]
    assert run and run[0].startswith("edgevlm export") and any(s.startswith("edgevlm run") for s in run)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(" && ".join(run), shell=True, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    # the sample is test scene 2 (tests/test_scenes.py checks the file): the answer is its cross's colour
    from edgevlm.data import scenes

    image = next(s for s in run if s.startswith("edgevlm run")).split("--image")[1].split()[0]
    assert image == "models/samples/scene_2.png" and "what color is the cross?" in block("main-command")
    truth = [o.color for o in scenes.make_scene("test", 2).objects if o.shape == "cross"]
    assert len(truth) == 1 and r.stdout.strip().splitlines()[-1].strip() == truth[0], r.stdout
