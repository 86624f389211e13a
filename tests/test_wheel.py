"""A non-editable install must work on its own: build the wheel, install it into a fresh virtual
environment, and compile an example from outside the source tree (templates ship inside the wheel)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                   check=True, timeout=600, cwd=out)
    (whl,) = out.glob("gspngen-*.whl")
    return whl


def test_wheel_ships_templates(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    templates = [n for n in names if n.startswith("gspngen/templates/") and n.endswith(".j2")]
    assert "gspngen/templates/package/__init__.py.j2" in templates
    assert any(n.startswith("gspngen/templates/triton/") for n in templates)
    assert any(n.startswith("gspngen/templates/cuda/") for n in templates)
    assert not any(n.startswith("templates/") for n in names)


# (about a minute; it stays in CI: installing is what a new user does first)
def test_fresh_venv_compiles_example(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True, timeout=900, env=env)
    subprocess.run(pip + [str(wheel)], check=True, timeout=900, env=env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = subprocess.run([str(venv / "bin" / "gspngen"), "compile", str(ROOT / "examples" / "gspn4.yaml"),
                        "-o", "gspn4_pkg"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    files = {p.name for p in (work / "gspn4_pkg").iterdir()}
    assert {"manifest.json", "__init__.py"} <= files and any(f.endswith(".cu") for f in files)
    code = ("import gspngen, torch, gspn4_pkg as g; from gspngen.testing import make_inputs; "
            "assert 'site-packages' in gspngen.__file__, gspngen.__file__; "
            "print(tuple(g.op(**make_inputs(g.spec, 1, 2, 3, 4, dtype=torch.float32)).shape))")
    r = subprocess.run([str(py), "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, 2, 3, 4)"
