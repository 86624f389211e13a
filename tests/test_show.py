"""`gspngen show SPEC --stage spec|lowered|cuda|triton`."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

import gspngen
from gspngen.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "gspn4.yaml"

GSPN4 = """\
name: gspn4
connection: 3
directions: [lr, rl, tb, bt]
normalization: stability
merge: learned
"""


@pytest.fixture
def example(tmp_path) -> Path:
    """examples/gspn4.yaml, or the same spec written here if the example is not in the tree."""
    if EXAMPLE.exists():
        return EXAMPLE
    path = tmp_path / "gspn4.yaml"
    path.write_text(GSPN4)
    return path


def show(capsys, *args) -> tuple[int, str, str]:
    code = main(["show", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_stage_spec_prints_the_normalised_yaml(capsys, example):
    code, out, err = show(capsys, example, "--stage", "spec")
    assert code == 0 and err == ""
    spec = gspngen.load_spec(example)
    assert yaml.safe_load(out) == spec.to_dict()
    assert "weight_groups: channel" in out and "chunk: null" in out  # defaults filled in


def test_stage_lowered_is_the_default(capsys, example):
    code, out, err = show(capsys, example)
    assert code == 0 and err == ""
    code2, out2, _ = show(capsys, example, "--stage", "lowered")
    assert out == out2
    assert "lowered IR of spec 'gspn4'" in out and "k=3 (radius r=1)" in out and "normalization=stability" in out
    # directions with axes and index maps
    assert "[0] lr: steps along W (forward, T=W), lanes along H (L=H)" in out
    assert "[1] rl: steps along W (reversed, T=W)" in out
    assert "[3] bt: steps along H (reversed, T=H), lanes along W (L=W)" in out
    assert "stride_step=-W" in out and "base_of_step0=W*(H - 1)" in out
    assert "offset(n, ch, t, i) = C*H*W*n + H*W*ch + W*i + t" in out
    # every block as name = expr lines
    for header in ("forward: inputs w0, w1, w2, e0, e1, e2, hp0, hp1, hp2, lam, x -> outputs h",
                   "output: inputs h, x, u, s, md -> outputs y",
                   "adjoint: inputs gh, w0", "-> outputs glam, gx, gw0, gw1, gw2, ghp0, ghp1, ghp2",
                   "adjoint_output: inputs gy, h, x, u, s, md -> outputs gh, gx, gu, gs, gmd"):
        assert header in out, header
    assert "recip(" in out and "exp2(" in out and "gw0 = select(e0, " in out and "\n  h = " in out and "\n  y = " in out
    assert "Piecewise" not in out


def test_lowered_layout_nhwc(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: cl\nlayout: nhwc\ndirections: [tb]\nnormalization: softmax\nmerge: mean\n")
    code, out, _ = show(capsys, path)
    assert code == 0
    assert "stride_step=C*W  stride_lane=C  stride_channel=1  base_of_step0=0" in out
    assert "exp2(" in out and "Max(" in out and "y = " in out


def fake_renderer(monkeypatch, name, files):
    module = types.ModuleType(f"gspngen.render.{name}")
    module.render_files = lambda spec: {fn: text.format(name=spec.name) for fn, text in files.items()}
    monkeypatch.setitem(sys.modules, f"gspngen.render.{name}", module)


def test_stage_cuda_prints_rendered_files(capsys, monkeypatch, example):
    fake_renderer(monkeypatch, "cuda", {"b.cu": "// kernel {name}\n", "a_launch.py": "x = 1"})
    code, out, err = show(capsys, example, "--stage", "cuda")
    assert code == 0 and err == ""
    assert out == "# ===== a_launch.py =====\nx = 1\n// ===== b.cu =====\n// kernel gspn4\n"


def test_stage_triton_prints_rendered_files(capsys, monkeypatch, example):
    fake_renderer(monkeypatch, "triton", {"kernels.py": "@triton.jit  # {name}\n"})
    code, out, _ = show(capsys, example, "--stage", "triton")
    assert code == 0 and out == "# ===== kernels.py =====\n@triton.jit  # gspn4\n"


def one_line_error(code, out, err, *needles):
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def test_missing_renderer_is_a_one_line_error(capsys, monkeypatch, example):
    monkeypatch.setitem(sys.modules, "gspngen.render.cuda", None)  # import raises ModuleNotFoundError
    one_line_error(*show(capsys, example, "--stage", "cuda"), "cuda renderer", "not available")


def test_backend_not_in_spec_is_a_one_line_error(capsys, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("name: only_triton\nbackends: [triton]\n")
    one_line_error(*show(capsys, path, "--stage", "cuda"), "only_triton", "['triton']")


def test_bad_spec_is_a_one_line_error(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nconnection: 4\n")
    one_line_error(*show(capsys, path), "connection", "4")
    one_line_error(*show(capsys, tmp_path / "missing.yaml", "--stage", "spec"), "missing.yaml")


def test_bad_stage_is_rejected(capsys, example):
    with pytest.raises(SystemExit) as info:
        main(["show", str(example), "--stage", "ptx"])
    assert info.value.code == 2


def test_entry_point(example):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "gspngen", "show", str(example)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "adjoint:" in r.stdout and "ghp2 = " in r.stdout
