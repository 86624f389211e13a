"""The command line: help, `gspngen compile` output, determinism, atomicity, one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gspngen
from gspngen import codegen
from gspngen.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gspngen", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "compile" in out and "gspngen compile examples/gspn4.yaml" in out


def test_compile_writes_importable_package(tmp_path):
    out = tmp_path / "pkg" / "gspn4_gen"
    r = run_cli("compile", ROOT / "examples" / "gspn4.yaml", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "gspn4" in r.stdout and str(out) in r.stdout
    files = tree(out)
    assert {"manifest.json", "__init__.py"} <= set(files)
    import json

    manifest = json.loads(files["manifest.json"])
    spec = gspngen.load_spec(ROOT / "examples" / "gspn4.yaml")
    assert manifest["spec"] == spec.to_dict() and manifest["spec_hash"] == spec.hash
    assert manifest["gspngen_version"] == gspngen.__version__
    assert set(manifest["files"]) == set(files) - {"manifest.json"}  # __init__.py is checked too
    code = ("import torch, gspn4_gen as g; from gspngen.testing import make_inputs; "
            "y = g.op(**make_inputs(g.spec, 1, 2, 3, 4, dtype=torch.float32)); print(tuple(y.shape))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=out.parent,
                       env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{out.parent}"}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, 2, 3, 4)"


def test_default_output_folder(tmp_path):
    r = run_cli("compile", ROOT / "examples" / "local8.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "generated" / "local8" / "manifest.json").is_file()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_deterministic(path, tmp_path):
    spec = gspngen.load_spec(path)
    a = tree(codegen.write_package(spec, tmp_path / "a"))
    b = tree(codegen.write_package(spec, tmp_path / "b"))
    assert a == b


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_committed_generated_output_is_current(path, tmp_path):
    """generated/<name> must be byte-identical to a fresh `gspngen compile` (regenerate and commit if not)."""
    spec = gspngen.load_spec(path)
    committed = ROOT / "generated" / spec.name
    assert committed.is_dir(), f"missing {committed}: run gspngen compile {path.relative_to(ROOT)}"
    fresh = tree(codegen.write_package(spec, tmp_path / spec.name))
    assert tree(committed) == fresh, f"generated/{spec.name} is stale: run gspngen compile examples/{path.name}"


@pytest.mark.parametrize("text,field", [
    ("name: t\nconnection: 4\n", "connection"),
    ("name: t\nconection: 3\n", "conection"),
    ("name: t\ndirections: [lr, [\n", "<yaml>"),
    ("- just\n- a list\n", "<document>"),
])
def test_bad_spec_one_line_exit_2_no_output(tmp_path, capsys, text, field):
    # in-process (a subprocess costs ~4 s of imports); test_missing_spec_file runs the real entry point
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    out = tmp_path / "out"
    assert main(["compile", str(spec), "-o", str(out)]) == 2
    stdout, stderr = capsys.readouterr()
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and f"'{field}'" in lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_missing_spec_file(tmp_path):
    r = run_cli("compile", tmp_path / "nope.yaml")
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "nope.yaml" in r.stderr


def test_failed_render_leaves_old_output_untouched(tmp_path, monkeypatch):
    spec = gspngen.load_spec(ROOT / "examples" / "gspn4.yaml")
    out = codegen.write_package(spec, tmp_path / "pkg")
    before = tree(out)

    def boom(spec):
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(codegen, "rendered_sources", boom)
    with pytest.raises(RuntimeError):
        codegen.write_package(spec, out)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_failed_write_leaves_no_temp_folder(tmp_path, monkeypatch):
    spec = gspngen.Spec.from_dict({"name": "t", "backends": []})
    real_rename = os.rename

    def failing_rename(a, b):
        if Path(b).name == "pkg":
            raise OSError("disk full")
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError):
        codegen.write_package(spec, tmp_path / "pkg")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_whole_folder(tmp_path):
    spec = gspngen.Spec.from_dict({"name": "t", "backends": []})
    out = codegen.write_package(spec, tmp_path / "pkg")  # an earlier gspngen output
    (out / "stale.txt").write_text("old")
    codegen.write_package(spec, out)
    assert not (out / "stale.txt").exists() and (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (codegen.write_package(spec, empty) / "manifest.json").exists()


@pytest.mark.parametrize("target", ["folder", "file", "dot"])
def test_compile_never_replaces_what_it_did_not_write(tmp_path, target, monkeypatch, capsys):
    """-o naming a user's folder or file is refused with one line; nothing there changes."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("precious")
    out = {"folder": work, "file": work / "thesis.tex", "dot": "."}[target]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(work)
    assert main(["compile", str(ROOT / "examples" / "local8.yaml"), "-o", str(out)]) == 2
    out_text, err = capsys.readouterr()
    assert out_text == "" and len(err.strip().splitlines()) == 1 and "-o" in err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert (work / "thesis.tex").read_text() == "precious"


def test_unwritable_output_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["compile", str(ROOT / "examples" / "local8.yaml"), "-o", str(blocker / "pkg")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot write" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
