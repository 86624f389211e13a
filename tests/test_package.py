"""Compiled packages are what runs: verified at import, loaded from anywhere, nothing rendered.

Also: importing gspngen (or a package) pulls in none of sympy, Jinja2, Triton
or CuPy; those load only when a backend needs them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gspngen
from gspngen.codegen import write_package
from gspngen.runtime import sources

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"name": "tiny_pkg", "directions": ["lr", "tb"], "connection": 3, "merge": "learned",
        "precision": ["fp32"], "backends": ["cuda", "triton"]}
HEAVY = ("sympy", "jinja2", "triton", "cupy")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(extra)
    return env


def _run(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A compiled package copied into a folder of another project (no templates/, not this repo)."""
    build = tmp_path_factory.mktemp("build")
    write_package(gspngen.Spec.from_dict(SPEC), build / "tiny_pkg")
    project = tmp_path_factory.mktemp("other_project")
    shutil.copytree(build / "tiny_pkg", project / "tiny_pkg")
    return project / "tiny_pkg"


# Blocks the lowering (our only sympy user) and Jinja2 for the child: importing either raises, so
# rendering cannot happen. (sympy itself cannot be blocked: torch's custom-op dispatch imports
# torch._dynamo, which imports it, at the first op call.)
NO_RENDER = "import sys; sys.modules['gspngen.lower'] = None; sys.modules['jinja2'] = None\n"
RUN_OP = """
import torch
from gspngen.testing import make_inputs
inputs = make_inputs(pkg.spec, 1, 2, 4, 5, dtype=torch.float32, requires_grad=True)
ref = gspngen.compile(pkg.spec, backend="reference")
for backend in BACKENDS:
    op = pkg.op if backend == "auto" else gspngen.compile(pkg.spec, backend=backend)
    y = op(**inputs)
    y.square().sum().backward()
    grads = [t.grad.clone() for t in inputs.values() if t is not None]
    for t in inputs.values():
        if t is not None:
            t.grad = None
    yr = ref(**{k: None if t is None else t.detach() for k, t in inputs.items()})
    assert torch.allclose(y, yr, rtol=1e-4, atol=1e-5), backend
    assert all(torch.isfinite(g).all() for g in grads), backend
    print(backend, "ok", op.resolve_backend(inputs["x"]))
"""


def test_copied_package_imports_by_name_and_runs_without_rendering(package):
    code = NO_RENDER + "import gspngen, tiny_pkg as pkg\nBACKENDS = ['auto', 'triton']\n" + RUN_OP + textwrap.dedent("""
        from gspngen.render import cuda as rc
        # the CUDA host plans from the manifest's facts and builds the package's own file
        assert rc.kernel_source(pkg.spec, "fp32") == (pkg.MANIFEST and open(pkg.__path__[0] + "/gspn_fp32.cu").read())
        rc.smem_bytes(pkg.spec, "bwd", rc.LANES, rc.KernelConfig(32, 1, 1, 1))
        print("lowered:", sys.modules.get("gspngen.lower"), "jinja2 loaded:", sys.modules.get("jinja2"))
    """)
    out = _run(code, cwd=package.parent, PYTHONPATH=str(package.parent), TRITON_INTERPRET="1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "auto ok reference" in out.stdout and "triton ok triton" in out.stdout
    assert "lowered: None jinja2 loaded: None" in out.stdout


def test_load_package_by_path_from_anywhere(package, tmp_path):
    code = NO_RENDER + f"import gspngen\npkg = gspngen.load_package({str(package)!r})\n" \
        + f"assert gspngen.load_package({str(package)!r}) is pkg\nBACKENDS = ['auto']\n" + RUN_OP
    out = _run(code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "auto ok reference" in out.stdout


def _copy(package: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pkg_copy"
    shutil.copytree(package, dst)
    return dst


@pytest.mark.parametrize("name", ["gspn_fp32.cu", "triton_kernels.py", "__init__.py"])
def test_edited_file_is_refused(package, tmp_path, name):
    pkg = _copy(package, tmp_path)
    path = pkg / name
    path.write_text(path.read_text() + "\n# edited\n")
    with pytest.raises(ImportError, match=rf"{name} was modified .*gspngen compile"):
        gspngen.load_package(pkg)


def test_missing_file_is_refused(package, tmp_path):
    pkg = _copy(package, tmp_path)
    (pkg / "gspn_fp32.cu").unlink()
    with pytest.raises(ImportError, match=r"gspn_fp32.cu is missing; regenerate"):
        gspngen.load_package(pkg)


def test_package_of_another_version_says_so_in_one_line(package, tmp_path):
    pkg = _copy(package, tmp_path)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["gspngen_version"] = "0.0.1"
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ImportError) as info:
        gspngen.load_package(pkg)
    msg = str(info.value)
    assert "compiled by gspngen 0.0.1, this is gspngen" in msg and "\n" not in msg


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", b'{"files": {}}'])
def test_broken_manifest_is_an_import_error(package, tmp_path, content):
    pkg = _copy(package, tmp_path)
    (pkg / "manifest.json").write_bytes(content)
    with pytest.raises(ImportError, match="manifest.json"):
        gspngen.load_package(pkg)


def test_manifest_naming_a_path_is_refused(package, tmp_path):
    pkg = _copy(package, tmp_path)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = "0" * 64
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ImportError, match="bad file name"):
        gspngen.load_package(pkg)


def test_not_a_package_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: .* is not a folder"):
        gspngen.load_package(tmp_path / "nope")
    with pytest.raises(ImportError, match="no __init__.py and manifest.json"):
        gspngen.load_package(tmp_path)


def test_loaded_package_sources_are_what_the_backends_get(package, monkeypatch):
    from gspngen.render import cuda as rc

    mod = gspngen.load_package(package)
    try:
        monkeypatch.setattr(rc, "render_source", lambda *a: pytest.fail("rendered although packaged"))
        assert rc.kernel_source(mod.spec, "fp32") == (package / "gspn_fp32.cu").read_text()
    finally:
        sources.forget(mod.spec.hash)


def test_committed_generated_packages_load():
    for folder in sorted((ROOT / "generated").iterdir()):
        mod = gspngen.load_package(folder)
        try:
            assert mod.spec.hash == mod.MANIFEST["spec_hash"] and set(mod.SOURCES) == set(mod.MANIFEST["files"])
        finally:
            sources.forget(mod.spec.hash)


@pytest.mark.parametrize("what", ["import gspngen", "import tiny_pkg", "import gspngen.cli; gspngen.cli.build_parser()"])
def test_import_pulls_in_no_heavy_module(package, what):
    code = f"import sys\n{what}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = _run(code, cwd=package.parent, PYTHONPATH=str(package.parent))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
