"""The rendered CUDA sources compile for sm_80 and sm_90 with no warning and no register spill.

Compiled here without a GPU: NVRTC through CuPy (the runtime's compiler, with
the runtime's options), else nvcc. ptxas' resource report (-Xptxas -v) is
parsed for every kernel: any spill, or any stack frame (a register array
indexed at run time), fails. Variants: every example spec and dtype (each
thread mapping's forward and backward, and the per-step kernels), the
default tunings at the paper benchmark's shapes, every candidate tuning at
one large shape, and specs covering k = 1 and 9, each normalisation, chunk,
nhwc and each merge.
"""

from __future__ import annotations

import glob
import io
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from gspngen.backends.cuda import CudaBackend
from gspngen.render import cuda as rc
from gspngen.runtime.cuda_build import build_options
from gspngen.spec import Spec, load_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(glob.glob(str(ROOT / "examples" / "*.yaml")))
ARCHS = ("sm_80", "sm_90")
# build_options() is what CupyRunner passes (-ftz=true included, the value CuPy appends itself);
# CuPy adds the device's -arch when it builds at run time. Compile the same here.
OPTIONS = build_options()
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
PAPER_SHAPES = [(16, 8, 1024, 1024), (1, 1152, 64, 64), (1, 32, 128, 128), (1, 128, 512, 512), (64, 144, 56, 56),
                (1, 16, 2048, 2048)]
H100 = (132, 227 * 1024)

_PROPS = re.compile(r"Function properties for (\S+)\n.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                    r"(\d+) bytes spill loads")


def _nvrtc(source: str, names: list[str], arch: str) -> str | None:
    try:
        from cupy.cuda import compiler
    except ImportError:
        return None
    prog = compiler._NVRTCProgram(source, "gspn.cu", name_expressions=names, method="cubin")
    log = io.StringIO()
    prog.compile(OPTIONS + (f"-arch={arch}", "-Xptxas=-v"), log)  # raises CompileException with the log
    return log.getvalue()


def _nvcc(source: str, names: list[str], arch: str, tmp: Path) -> str | None:
    if NVCC is None:
        return None
    params = {fam: ", ".join(f"{rc.C_TYPES[k]} {n}" for k, n in p) for fam, p in rc.PARAMS.items()}
    lines = []
    for name in names:
        fam = re.match(r"gspn_(\w+?)<", name).group(1)
        lines.append(f"template __global__ void {name}({params[fam]});")
    src = tmp / "gspn.cu"
    src.write_text(source + "\n" + "\n".join(lines) + "\n")
    opts = [o for o in OPTIONS if o != "-ftz=true"] + ["-ftz=true"]
    r = subprocess.run([NVCC, "-cubin", f"-arch={arch}", *opts, "-Xptxas", "-v", "-o", str(tmp / "gspn.cubin"),
                        str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("nvcc error:\n" + r.stderr[-8000:])
    return r.stdout + r.stderr


def _compile_log(source: str, names: list[str], arch: str) -> str | None:
    log = _nvrtc(source, names, arch)
    if log is None:
        with tempfile.TemporaryDirectory() as tmp:
            log = _nvcc(source, names, arch, Path(tmp))
    return log


def compile_report(source: str, names: list[str], arch: str) -> dict[str, tuple[int, int, int]]:
    """{mangled kernel: (stack frame, spill stores, spill loads)}; fails on any warning."""
    return _reports([(source, names, arch)])[0]


_POOL = None


def _pool() -> ProcessPoolExecutor:
    """Two worker processes: NVRTC is single-threaded and CI has two cores."""
    global _POOL
    if _POOL is None:
        _POOL = ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1),
                                    mp_context=multiprocessing.get_context("fork"))
    return _POOL


def _reports(jobs: list[tuple[str, list[str], str]], chunk: int = 4) -> list[dict[str, tuple[int, int, int]]]:
    """Compile every (source, names, arch), names split in chunks over the workers."""
    split = [(src, names[i:i + chunk], arch) for src, names, arch in jobs for i in range(0, len(names), chunk)]
    logs = list(_pool().map(_compile_log, *zip(*split)))
    if any(log is None for log in logs):
        if os.environ.get("CI"):
            pytest.fail("no CUDA compiler: install cupy-cuda13x + nvidia-cuda-nvrtc, or put nvcc on PATH")
        pytest.skip("no CUDA compiler (NVRTC via cupy, or nvcc)")
    out: list[dict[str, tuple[int, int, int]]] = [{} for _ in jobs]
    j = 0
    for k, (src, names, arch) in enumerate(jobs):
        for i in range(0, len(names), chunk):
            log = logs[j]
            j += 1
            warnings = [line for line in log.splitlines() if "warning" in line.lower()]
            assert not warnings, "\n".join(warnings[:20])
            out[k].update({m.group(1): tuple(int(m.group(i)) for i in (2, 3, 4)) for m in _PROPS.finditer(log)})
        assert len(out[k]) == len(set(names)), f"expected {len(set(names))} kernels in the report, got {len(out[k])}"
    return out


def assert_no_spills(report: dict[str, tuple[int, int, int]], what: str) -> None:
    bad = {k: v for k, v in report.items() if any(v)}
    assert not bad, f"{what}: stack frame / spill stores / spill loads in " + ", ".join(
        f"{k[:70]}={v}" for k, v in bad.items())


def variant_names(spec: Spec, dname: str, C: int = 8, H: int = 64, W: int = 64) -> list[str]:
    """Every fused kernel a forward and backward instantiate (one per thread mapping, and step order for
    the steps mapping), at a shape where every access is a whole vector; and the per-step kernels."""
    names = CudaBackend(runner=object()).kernel_names(spec, dname, (1, C, H, W), H100)
    return names + list(rc.per_step_names(spec.groups(C) != C).values()) + [rc.transpose_name(a) for a in (False, True)]


def _check(cases: list[tuple[Spec, str, list[str]]], archs, what: str) -> None:
    """Compile each (spec, dtype, names) for each arch; no warning, no spill, no stack frame."""
    jobs = [(rc.render_source(spec, dname), names, arch) for spec, dname, names in cases for arch in archs]
    labels = [f"{what} {spec.name} {dname} {arch}" for spec, dname, _ in cases for arch in archs]
    for report, label in zip(_reports(jobs), labels):
        assert_no_spills(report, label)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: Path(p).stem)
def test_examples_compile_without_spills(path):
    spec = load_spec(path)
    _check([(spec, dname, variant_names(spec, dname)) for dname in spec.precision], ARCHS, "example")


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_paper_shape_defaults_compile_without_spills(dname):
    """The tunings the backend picks on an H100 for the benchmark's shapes, every direction."""
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    be = CudaBackend(runner=object())
    names = []
    for shape in PAPER_SHAPES:
        names += be.kernel_names(spec, dname, shape, H100)
    names = list(dict.fromkeys(names))
    _check([(spec, dname, names)], ("sm_90",), "paper shapes")


def test_candidate_configs_compile_without_spills():
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    names = []
    for direction in ("lr", "tb"):  # one per thread mapping
        mapping = rc.thread_map(spec, direction)
        for kind in ("fwd", "bwd"):
            for cfg in rc.candidate_configs(spec, "fp32", direction, kind, 8, 512, 512)[1:]:  # the default is tested above
                names.append(rc.fused_name(kind, mapping, False, cfg, cfg.vec > 1, False))
    # the paper shape's long lines: the default has no tile in flight; a half-width prefetch-2 candidate does
    lr = rc.candidate_configs(spec, "fp32", "lr", "fwd", 8, 1024, 1024)
    assert lr[0].prefetch == 1 and any(c.prefetch == 2 and c.vec == lr[0].vec // 2 for c in lr[1:])
    for cfg in lr[1:]:
        names.append(rc.fused_name("fwd", rc.STEPS, False, cfg, cfg.vec > 1, False))
    names = list(dict.fromkeys(names))
    assert len(names) >= 8
    _check([(spec, "fp32", names)], ("sm_90",), "candidates")


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_cluster_tunings_compile_without_spills(dname):
    """cl=2/4/8 (lines split over thread block clusters) at the paper shapes, both mappings and passes, for
    sm_90 (clusters need it); the plain kernels of the same source still build for sm_80 (the examples)."""
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    names = []
    for N, C, H, W in PAPER_SHAPES:
        for cl in rc.CLUSTER_SIZES:
            be = CudaBackend(runner=object()).with_config(f"cl={cl}", f"cl={cl}")
            names += [n for n in be.kernel_names(spec, dname, (N, C, H, W), H100) if "_cl<" in n]
    names = list(dict.fromkeys(names))
    assert len(names) >= 16 and any(n.startswith("gspn_bwd_cl<0") for n in names) \
        and any(n.startswith("gspn_fwd_cl<1") for n in names)
    _check([(spec, dname, names)], ("sm_90",), "clusters")


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_ring_tunings_compile_without_spills(dname):
    """The cp.async ring (every ring candidate at the paper shapes, both mappings and passes) for sm_80 and
    sm_90, and the registers it frees: at 16x8x1024^2 the lr forward keeps no tile in flight in registers
    (prefetch 1); its ring tuning has one in shared memory for far fewer registers (ptxas)."""
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    names = []
    for N, C, H, W in PAPER_SHAPES:
        for dn in spec.directions:
            mapping, rev = rc.thread_map(spec, dn), dn in ("rl", "bt")
            names += [rc.fused_name("fwd", mapping, rev, c, True, save_h=s)
                      for c in rc.candidate_configs(spec, dname, dn, "fwd", C, H, W) if c.ring for s in (True, False)]
            names += [rc.fused_name("bwd", mapping, rev, c, True)
                      for c in rc.candidate_configs(spec, dname, dn, "bwd", C, H, W) if c.ring]
    names = list(dict.fromkeys(names))
    assert len(names) >= 30 and any(n.startswith("gspn_bwd<") for n in names)
    _check([(spec, dname, names)], ARCHS, "ring")
    if dname == "fp32":
        base = rc.default_config(spec, dname, "lr", "fwd", 8, 1024, 1024)
        ring = [c for c in rc.candidate_configs(spec, dname, "lr", "fwd", 8, 1024, 1024) if c.ring][0]
        pair = [rc.fused_name("fwd", rc.STEPS, False, c, True) for c in (base, ring)]
        from gspngen import perfmodel as pm

        facts = pm.kernel_facts(rc.kernel_source(spec, dname), pair, "sm_90")
        assert base.prefetch == 1 and ring.prefetch == 2
        assert facts[pair[1]].registers < 0.6 * facts[pair[0]].registers, facts


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_one_launch_compiles_without_spills(dname):
    """ml=1 (every direction of a pass in one launch): alone at the paper shapes where it plans (sm_80 and
    sm_90), and with cl=2/4/8 (sm_90), among them the 16-thread blocks of 128-lane lines under cl=8."""
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    plain, clustered = [], []
    for N, C, H, W in PAPER_SHAPES:
        for key in ["ml=1"] + [f"cl={cl},ml=1" for cl in rc.CLUSTER_SIZES]:
            be = CudaBackend(runner=object()).with_config(key, key)
            try:
                names = be.kernel_names(spec, dname, (N, C, H, W), H100)
            except ValueError:  # no tunings of one thread count at this shape: the key is not offered
                assert key not in CudaBackend().candidates(spec, dname, "fwd", (N, C, H, W))
                continue
            (clustered if "cl=" in key else plain).extend(n for n in names if "_ml" in n)
    plain, clustered = list(dict.fromkeys(plain)), list(dict.fromkeys(clustered))
    assert len(plain) >= 3 and len(clustered) >= 6 and any(", GsForward<0, false, 16, 1, 1," in n for n in clustered)
    _check([(spec, dname, plain)], ARCHS, "one launch")
    _check([(spec, dname, clustered)], ("sm_90",), "one launch, clusters")


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_onchip_forward_compiles_without_spills(dname):
    """oc=1's kernel (every direction in one block per plane, y in shared memory) for gspn4 at planes it
    serves: 128^2 (fp32, bf16; scalar tb/bt lanes, vector lr/rl steps), 200 x 136 (224 threads), 128 x 135
    (no vectors at all), 64 x 256 and 8 x 64 (vector tb/bt lanes too), 4 x 1024 and 256^2 in bf16 (256
    threads, the most). Planes needing segments are refused by the planner (they spilled)."""
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    shapes = [(128, 128), (200, 136), (128, 135), (64, 256), (8, 64)] + (
        [(256, 256), (4, 1024)] if dname == "bf16" else [])
    assert all(rc.onchip_plan(spec, dname, H, W) is None for H, W in ((300, 8), (1000, 8), (2, 4096), (4, 2048)))
    names = []
    for H, W in shapes:
        plan = rc.onchip_plan(spec, dname, H, W, H100[1])
        assert plan is not None and plan.smem <= H100[1], (H, W)
        names += [plan.name(True), plan.name(False)]
    _check([(spec, dname, list(dict.fromkeys(names)))], ARCHS, "on-chip forward")


FEATURES = [
    dict(connection=1, directions=["rl", "tb"], normalization="softmax", chunk=3, merge="stack", layout="nhwc"),
    dict(connection=9, directions=["lr", "bt"], normalization="none", merge="sum", modulation=False),
    dict(connection=5, directions=["bt", "lr"], weight_groups=2, merge="mean", skip=False),
    dict(connection=7, directions=["tb"], normalization="softmax", weight_groups="shared", chunk=1,
         modulation=False, skip=False, merge="learned", layout="nhwc"),
]


@pytest.mark.parametrize("features", FEATURES, ids=lambda d: f"k{d['connection']}-{d.get('normalization', 'stability')}-{d['merge']}")
def test_feature_specs_compile_without_spills(features):
    spec = Spec.from_dict({"name": "feat", "precision": ["fp32", "fp16"], **features})
    dname = "fp16" if features["connection"] in (1, 9) else "fp32"  # both dtypes across the set
    _check([(spec, dname, variant_names(spec, dname))], ("sm_90",), spec.to_json())


def test_compile_errors_are_reported():
    """The check can fail: a source with a broken line does not compile."""
    spec = Spec.from_dict({"name": "bad", "directions": ["tb"]})
    source = rc.render_source(spec, "fp32").replace("gs_blk_forward(f_w[0]", "gs_blk_forward(not_defined, f_w[0]", 1)
    with pytest.raises(Exception, match="not_defined|error"):
        compile_report(source, variant_names(spec, "fp32")[:1], "sm_90")


def test_spill_report_is_parsed():
    log = ("ptxas info    : Function properties for _Z3fooPf\n"
           "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n")
    report = {m.group(1): tuple(int(m.group(i)) for i in (2, 3, 4)) for m in _PROPS.finditer(log)}
    assert report == {"_Z3fooPf": (8, 4, 4)}
    with pytest.raises(AssertionError, match="spill"):
        assert_no_spills(report, "x")


# -- rendering: deterministic, validated, nothing of the spec but numbers and flags ---------------

def test_render_files_one_source_per_dtype_and_deterministic():
    spec = load_spec(ROOT / "examples" / "wide5.yaml")
    files = rc.render_files(spec)
    assert sorted(files) == ["gspn_bf16.cu", "gspn_fp16.cu", "gspn_fp32.cu"]
    rc.render_source.cache_clear()
    assert rc.render_files(spec) == files
    assert files["gspn_fp32.cu"] != files["gspn_bf16.cu"]
    assert "#define GS_STORE 2" in files["gspn_bf16.cu"]


def test_spec_name_never_reaches_the_source():
    spec = Spec.from_dict({"name": "zq_secret_name_zq", "connection": 5})
    assert "zq_secret_name_zq" not in rc.render_source(spec, "fp32")


def test_printed_lines_are_validated(monkeypatch):
    spec = Spec.from_dict({"name": "v", "connection": 3})
    rc.render_source.cache_clear()
    import gspngen.lower as lower  # the renderer imports print_block from here when it renders

    real = lower.print_block
    monkeypatch.setattr(lower, "print_block", lambda block, lang: real(block, lang) + ['const float y2 = system("x");'])
    with pytest.raises(ValueError, match="printed line"):
        rc.render_context(spec, "fp32")
    monkeypatch.setattr(lower, "print_block", lambda block, lang: real(block, lang) + ["const float q = puts(0);"])
    with pytest.raises(ValueError, match="not an allowed libm function"):
        rc.render_context(spec, "fp32")
    with pytest.raises(ValueError, match="dtype"):
        rc.render_context(spec, "fp64")


def test_backend_rejects_what_it_cannot_run():
    import torch

    from gspngen.backends.cuda import CudaPerStepBackend
    from gspngen.testing import make_inputs

    spec = Spec.from_dict({"name": "r", "directions": ["tb"]})
    inp = make_inputs(spec, 1, 2, 4, 4, dtype=torch.float32)
    args = [inp[k] for k in ("x", "w", "lam", "u", "s", "m")]
    for be in (CudaBackend(), CudaPerStepBackend()):
        assert not be.available(torch.device("cpu"))
        with pytest.raises(ValueError, match="x: the cuda"):
            be.forward(spec, *args)
        with pytest.raises(TypeError, match="x: the cuda.* fp32, fp16 or bf16"):
            be.forward(spec, *[a.double() for a in args])


def test_configs_are_checked():
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    be = CudaBackend(runner=object(), configs=lambda *a: rc.KernelConfig(16, 1, 4, 1))  # 16 threads: invalid
    with pytest.raises(ValueError, match="invalid CUDA kernel config"):
        be.plan(spec, "fp32", "fwd", 0, (1, 4, 32, 32), [], acc=False, watom=False, limits=H100)
    be = CudaBackend(runner=object(), configs=lambda *a: rc.KernelConfig(32, 1, 1, 1))  # covers 32 of 64 lanes
    with pytest.raises(ValueError, match="covers 32 lanes"):
        be.plan(spec, "fp32", "fwd", 0, (1, 4, 64, 64), [], acc=False, watom=False, limits=H100)
    with pytest.raises(ValueError, match="shared memory"):
        rc.default_config(spec, "fp32", "tb", "bwd", 4, 8, 10**6, smem_limit=227 * 1024)
