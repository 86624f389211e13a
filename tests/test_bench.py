"""The benchmark: byte accounting against hand counts, the harness end to end on CPU, CLI errors."""

from __future__ import annotations

import json
import time

import pytest
import torch

from gspngen import Spec
from gspngen import bench
from gspngen.bench import (
    PAPER_SUITE,
    BenchConfig,
    _add_speedups,
    _prepare_copies,
    base_inputs,
    byte_breakdown,
    cpu_scaled,
    format_table,
    minimal_bytes,
    rotation_copies,
    run_bench,
    select_shapes,
    time_calls,
    write_json,
)
from gspngen.cli import main
from gspngen.validate import expected_shapes

MIB = 1 << 20

# ---------------------------------------------------------------------------
# Byte accounting. Shape N=2, C=4, H=3, W=5: 15 pixels, N*C*H*W = 120.
# Element counts below are worked out by hand from DESIGN §3, not by the code:
#   x: N*C*P = 120        w: N*D*k*G*P        lam/u/s: N*D*C*P        m: D
# ---------------------------------------------------------------------------

BASE = {"name": "b", "connection": 3, "directions": ["lr", "rl", "tb", "bt"], "weight_groups": "channel",
        "modulation": True, "skip": True, "merge": "learned"}

CASES = [
    # (spec overrides, forward input elements, y elements)
    ({}, {"x": 120, "w": 2 * 4 * 3 * 4 * 15, "lam": 480, "u": 480, "s": 480, "m": 4}, 120),
    ({"modulation": False}, {"x": 120, "w": 1440, "lam": 480, "s": 480, "m": 4}, 120),
    ({"skip": False}, {"x": 120, "w": 1440, "lam": 480, "u": 480, "m": 4}, 120),
    ({"modulation": False, "skip": False}, {"x": 120, "w": 1440, "lam": 480, "m": 4}, 120),
    ({"merge": "sum"}, {"x": 120, "w": 1440, "lam": 480, "u": 480, "s": 480}, 120),
    ({"merge": "mean"}, {"x": 120, "w": 1440, "lam": 480, "u": 480, "s": 480}, 120),
    ({"merge": "stack"}, {"x": 120, "w": 1440, "lam": 480, "u": 480, "s": 480}, 480),
    ({"weight_groups": "shared"}, {"x": 120, "w": 2 * 4 * 3 * 1 * 15, "lam": 480, "u": 480, "s": 480, "m": 4}, 120),
    ({"weight_groups": 2}, {"x": 120, "w": 2 * 4 * 3 * 2 * 15, "lam": 480, "u": 480, "s": 480, "m": 4}, 120),
    ({"connection": 1}, {"x": 120, "w": 2 * 4 * 1 * 4 * 15, "lam": 480, "u": 480, "s": 480, "m": 4}, 120),
    ({"connection": 5}, {"x": 120, "w": 2 * 4 * 5 * 4 * 15, "lam": 480, "u": 480, "s": 480, "m": 4}, 120),
    ({"connection": 9}, {"x": 120, "w": 2 * 4 * 9 * 4 * 15, "lam": 480, "u": 480, "s": 480, "m": 4}, 120),
    ({"directions": ["tb"]}, {"x": 120, "w": 2 * 1 * 3 * 4 * 15, "lam": 120, "u": 120, "s": 120, "m": 1}, 120),
    ({"directions": ["lr", "bt"], "merge": "stack"},
     {"x": 120, "w": 2 * 2 * 3 * 4 * 15, "lam": 240, "u": 240, "s": 240}, 240),
    # layout, chunk and normalisation change no count
    ({"layout": "nhwc"}, {"x": 120, "w": 1440, "lam": 480, "u": 480, "s": 480, "m": 4}, 120),
    ({"chunk": 2, "normalization": "none"}, {"x": 120, "w": 1440, "lam": 480, "u": 480, "s": 480, "m": 4}, 120),
]


@pytest.mark.parametrize("overrides,inputs,y", CASES, ids=[str(c[0]) for c in CASES])
@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), ("bf16", 2), (torch.float16, 2), (torch.float64, 8)])
def test_byte_accounting_matches_hand_counts(overrides, inputs, y, dtype, size):
    spec = Spec.from_dict({**BASE, **overrides})
    fwd = byte_breakdown(spec, 2, 4, 3, 5, dtype, "forward")
    assert fwd == {"read": {k: v * size for k, v in inputs.items()}, "write": {"y": y * size}}
    assert minimal_bytes(spec, 2, 4, 3, 5, dtype, "forward") == (sum(inputs.values()) + y) * size

    bwd = byte_breakdown(spec, 2, 4, 3, 5, dtype, "backward")
    assert bwd["read"] == {"gy": y * size, **{k: v * size for k, v in inputs.items()}}
    assert bwd["write"] == {"g" + k: v * size for k, v in inputs.items()}
    assert minimal_bytes(spec, 2, 4, 3, 5, dtype, "backward") == (y + 2 * sum(inputs.values())) * size


def test_byte_totals_literal():
    # gspn4 at N=2 C=4 H=3 W=5, fp32: 120 + 1440 + 3*480 + 4 inputs, 120 out
    spec = Spec.from_dict(BASE)
    assert minimal_bytes(spec, 2, 4, 3, 5, torch.float32) == 12496
    assert minimal_bytes(spec, 2, 4, 3, 5, torch.float32, "backward") == 24512
    assert minimal_bytes(spec, 2, 4, 3, 5, "bf16") == 6248
    with pytest.raises(ValueError, match="pass_"):
        minimal_bytes(spec, 2, 4, 3, 5, "fp32", "sideways")
    with pytest.raises(ValueError, match="dtype"):
        minimal_bytes(spec, 2, 4, 3, 5, "fp8")


# ---------------------------------------------------------------------------
# Harness pieces
# ---------------------------------------------------------------------------

def test_rotation_copies():
    GB = 1 << 30
    assert rotation_copies(10 * MIB, 50 * MIB, GB) == 11  # 1 + ceil(100/10): together > 2 x L2
    assert rotation_copies(100 * MIB, 50 * MIB, GB) == 1  # flushes the cache by itself
    assert rotation_copies(30 * MIB, 50 * MIB, GB) == 5
    assert rotation_copies(10 * MIB, 50 * MIB, 30 * MIB) == 3  # memory budget wins
    assert rotation_copies(1, 50 * MIB, GB, max_copies=7) == 7
    assert rotation_copies(10 * MIB, 50 * MIB, 0) == 1


def test_time_calls_rotates_and_respects_cap():
    seen = []
    timing = time_calls(seen.append, torch.device("cpu"), warmup=2, iters=5)
    assert seen == list(range(7)) and len(timing.ms) == len(timing.host_ms) == 5
    assert all(t >= 0 for t in timing.ms)
    capped = time_calls(lambda i: time.sleep(0.03), torch.device("cpu"), warmup=1, iters=100, max_seconds=0.12)
    assert 3 <= len(capped.ms) <= 4
    assert min(capped.ms) >= 25.0  # milliseconds


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_inputs_are_a_make_inputs_tile_repeated(layout):
    spec = Spec.from_dict({**BASE, "layout": layout, "weight_groups": 2})
    shape = (2, 4, 40, 35)  # larger than one 32 x 32 tile, not a multiple of it
    base = base_inputs(spec, shape, seed=3)
    copies, gys = _prepare_copies(spec, shape, torch.bfloat16, torch.device("cpu"), base, n_copies=3, seed=3)
    expected = expected_shapes(spec, *shape)
    assert len(copies) == len(gys) == 3
    assert copies[1]["x"].data_ptr() != copies[0]["x"].data_ptr()  # distinct memory per copy
    for name in ("x", "w", "lam", "u", "s", "m"):
        t = copies[2][name]
        assert tuple(t.shape) == expected[name] and t.dtype == torch.bfloat16 and t.is_contiguous()
    x, x0 = copies[0]["x"], base["x"].to(torch.bfloat16)
    if layout == "nhwc":
        x, x0 = x.movedim(-1, 1), x0.movedim(-1, 1)
    assert torch.equal(x[1, :, 39, 34], x0[0, :, 39 - 32, 34 - 32])
    assert torch.equal(x[0, :, :32, :32], x0[0])
    assert tuple(gys[0].shape) == tuple(copies[0]["x"].shape)


def test_speedups_are_baseline_over_backend():
    def ok(backend, f, b):
        res = lambda ms: {"median_ms": ms, "speedup_vs_reference": None, "speedup_vs_cuda_per_step": None}  # noqa: E731
        return {"backend": backend, "status": "ok", "forward": res(f), "backward": res(b)}

    group = [ok("cuda", 1.0, 2.0), ok("cuda_per_step", 40.0, 100.0),
             {"backend": "reference", "status": "skipped", "forward": None, "backward": None}]
    _add_speedups(group)
    assert group[0]["forward"]["speedup_vs_cuda_per_step"] == 40.0
    assert group[0]["backward"]["speedup_vs_cuda_per_step"] == 50.0
    assert group[0]["forward"]["speedup_vs_reference"] is None  # reference skipped
    assert group[1]["forward"]["speedup_vs_cuda_per_step"] == 1.0


def test_cpu_suite_is_scaled_down_and_valid():
    spec = Spec.from_dict({**BASE, "weight_groups": 4})
    cfg = BenchConfig(suite="paper")
    chosen, notes = select_shapes(cfg, spec, torch.device("cpu"))
    # every suite shape is represented by its scaled shape, each scaled shape once, in suite order
    scaled = [cpu_scaled(spec, s, cfg.cpu_suite_max_elements) for s, _ in PAPER_SUITE]
    assert [run for run, _, _ in chosen] == list(dict.fromkeys(scaled))
    assert all(orig in [s for s, _ in PAPER_SUITE] for _, orig, _ in chosen)
    for run, _, _ in chosen:
        N, C, H, W = run
        assert N == 1 and H <= 8 and W <= 8 and C % 4 == 0
        assert N * C * H * W <= 2 * cfg.cpu_suite_max_elements
    assert any("scaled down" in n for n in notes)
    assert cpu_scaled(spec, (1, 1152, 64, 64), 4096) == (1, 36, 8, 8)
    runs = [run for run, _, _ in chosen]
    assert len(runs) == len(set(runs)), runs  # two suite shapes scaling alike are timed once
    assert cpu_scaled(Spec.from_dict(BASE), (1, 1152, 64, 64), 4096) == (1, 36, 8, 8)


# ---------------------------------------------------------------------------
# End to end on CPU
# ---------------------------------------------------------------------------

def test_harness_end_to_end_on_cpu(tmp_path):
    spec = Spec.from_dict({**BASE, "weight_groups": 2})
    cfg = BenchConfig(shapes=[(1, 2, 4, 5)], dtypes=["fp32"], backends=["reference", "cuda_per_step"],
                      device="cpu", warmup=1, iters=2, copy_bytes=MIB, max_copies=4)
    report = run_bench(spec, cfg)

    env = report["environment"]
    for key in ("gpu", "torch", "cuda", "cupy", "triton"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["gpu"] is None
    copy = report["copy_bandwidth"]
    assert copy["bytes"] == 2 * MIB and copy["gbps"] > 0

    ref, per_step = report["results"]
    assert ref["backend"] == "reference" and ref["status"] == "ok" and ref["copies"] == 4
    for pass_ in ("forward", "backward"):
        r = ref[pass_]
        assert r["iters"] == 2 and r["median_ms"] > 0
        assert r["bytes"] == minimal_bytes(spec, 1, 2, 4, 5, torch.float32, pass_)
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["fraction_of_copy"] == pytest.approx(r["gbps"] / copy["gbps"])
        assert r["speedup_vs_reference"] == 1.0
        assert r["speedup_vs_cuda_per_step"] is None
    assert per_step["backend"] == "cuda_per_step" and per_step["status"] == "skipped" and per_step["note"]

    table = format_table(report)
    assert "1,2,4,5" in table and "reference" in table and "copy bandwidth" in table
    assert "skipped" in table and "cuda_per_step" in table

    out = tmp_path / "bench.json"
    write_json(report, out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temp file left behind


def _spec_file(tmp_path, **overrides):
    path = tmp_path / "spec.yaml"
    path.write_text(Spec.from_dict({**BASE, **overrides}).to_yaml())
    return str(path)


def test_cli_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["bench", _spec_file(tmp_path), "--shape", "1,2,4,4", "--dtype", "fp32", "--iters", "1",
               "--copy-mib", "1", "--json", str(out), "-q"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "1,2,4,4" in captured.out and "fwd GB/s" in captured.out and "versions: torch" in captured.out
    data = json.loads(out.read_text())
    assert {"environment", "copy_bandwidth", "results", "spec", "notes"} <= set(data)
    row = data["results"][0]
    assert row["status"] == "ok"
    assert {"median_ms", "bytes", "gbps", "fraction_of_copy", "speedup_vs_reference",
            "speedup_vs_cuda_per_step"} <= set(row["forward"])
    assert set(row["forward_no_grad"]) == set(row["forward"]) and row["forward_no_grad"]["median_ms"] > 0
    assert row["forward_no_grad"]["bytes"] == row["forward"]["bytes"]  # the same minimal bytes
    assert "fwd0 ms" in captured.out
    assert {"torch", "cuda", "cupy", "triton", "gpu"} <= set(data["environment"])


def test_no_grad_forward_is_timed_as_a_module_runs_it(monkeypatch):
    """The fwd0 column times the backend's forward with need_saved=False (no h store), as
    GSPN modules call it under torch.no_grad(); fwd times the op, which stores h."""
    from gspngen.backends import get_backend
    from gspngen.testing import make_inputs

    real = get_backend("reference")
    seen = []

    class Spy:
        def forward(self, spec, x, w, lam, u, s, m, need_saved=True):
            seen.append(need_saved)
            return real.forward(spec, x, w, lam, u, s, m, need_saved=need_saved)

    monkeypatch.setattr("gspngen.backends.get_backend", lambda name: Spy())
    spec = Spec.from_dict(BASE)
    inputs = make_inputs(spec, 1, 2, 4, 4, dtype=torch.float32, seed=0)
    gy = torch.randn(expected_shapes(spec, 1, 2, 4, 4)["x"])
    fwd, fwd0, bwd = bench._measure_backend(spec, "reference", [inputs], [gy], torch.device("cpu"),
                                            warmup=1, iters=3, max_seconds=10.0)
    assert len(fwd.ms) == len(fwd0.ms) == len(bwd.ms) == 3
    assert len(seen) == 4 and not any(seen)  # warm-up and timed calls, none storing h


def test_cli_paper_suite_runs_scaled_on_cpu(tmp_path, capsys):
    rc = main(["bench", _spec_file(tmp_path, directions=["lr", "tb"]), "--suite", "paper", "--dtype", "bf16",
               "--iters", "1", "--copy-mib", "1", "-q"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "scaled down" in captured.out
    spec = Spec.from_dict({**BASE, "directions": ["lr", "tb"]})
    unique = {cpu_scaled(spec, s, BenchConfig().cpu_suite_max_elements) for s, _ in PAPER_SUITE}
    rows_per_shape = len(bench.default_backends(torch.device("cpu")))  # cpu and reference where cpu builds
    assert captured.out.count(" bf16 ") == len(unique) * rows_per_shape and len(unique) < len(PAPER_SUITE)


@pytest.mark.parametrize("argv,option", [
    (["--shape", "1,2,3"], "--shape"),
    (["--shape", "1,x,4,4"], "--shape"),
    (["--shape", "1,0,4,4"], "--shape"),
    (["--shape", "1,3,4,4"], "--shape"),  # C=3 not divisible by weight_groups=2
    (["--dtype", "fp8"], "--dtype"),
    (["--dtype", "fp32", "float"], "--dtype"),
    (["--backend", "nope"], "--backend"),
    (["--suite", "big"], "--suite"),
    (["--iters", "0"], "--iters"),
    (["--warmup", "many"], "--warmup"),
    (["--json", "/nonexistent-dir/r.json"], "--json"),
    (["--json", "."], "--json"),  # a folder: refused before the run, not after it
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, argv, option):
    rc = main(["bench", _spec_file(tmp_path, weight_groups=2), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and option in err and "Traceback" not in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_harness_on_gpu():
    spec = Spec.from_dict({**BASE, "precision": ["fp32", "bf16"]})
    cfg = BenchConfig(shapes=[(1, 8, 32, 32)], dtypes=["bf16"], device="cuda", iters=5, copy_bytes=64 * MIB)
    report = run_bench(spec, cfg)
    assert report["environment"]["gpu"] and report["copy_bandwidth"]["gbps"] > 10
    rows = {r["backend"]: r for r in report["results"]}
    assert set(rows) == {"cuda", "triton", "cuda_per_step", "reference"}
    assert rows["reference"]["status"] == "ok"
    for r in rows.values():
        assert r["status"] in ("ok", "skipped"), r["note"]
        if r["status"] == "ok":
            runs = r["forward"]["iters"]
            assert runs == (5 if r["backend"] == "reference" else 20)  # at least 20 timed runs on a GPU
            assert r["forward"]["median_ms"] > 0 and r["backward"]["median_ms"] > 0
            assert r["copies"] > 1  # a tiny set is rotated to defeat the L2


def test_time_calls_cuts_warmup_of_slow_calls():
    seen = []

    def slow(i):
        seen.append(i)
        time.sleep(0.02)

    timing = time_calls(slow, torch.device("cpu"), warmup=10, iters=3, max_seconds=0.1)
    assert seen[:2] == [0, 1] and len(seen) - len(timing.ms) == 2  # warm-up stopped after two calls
