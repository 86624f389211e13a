"""The autotuner on CPU: candidates, verification, selection, replay, run-time use, ranks, CLI.

Every test gets its own GSPNGEN_CACHE_DIR (the autouse fixture below) and a
clean in-memory state. Real tunings use tiny shapes and small budgets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gspngen
from gspngen.api import default_backend
from gspngen import Spec
from gspngen.backends import register_backend, unregister_backend
from gspngen.backends.reference import ReferenceBackend
from gspngen.testing import make_inputs
from gspngen.tune import cache as tcache
from gspngen.tune import keys as tkeys
from gspngen.tune import lookup, select
from gspngen.tune.replay import replay
from gspngen.tune.tuner import tune

ROOT = Path(__file__).resolve().parents[1]
GSPN4 = ROOT / "examples" / "gspn4.yaml"
SMALL = (1, 4, 8, 8)
ARGS = ("x", "w", "lam", "u", "s", "m")
# A GPU's identity, for replaying GPU-like timings on a CPU machine.
H200 = {"type": "cuda", "name": "NVIDIA H200", "cc": "9.0", "sms": 132, "memory_gib": 140}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GSPNGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GSPNGEN_AUTOTUNE", raising=False)
    tcache.reset_memory()
    lookup.forget()
    yield tmp_path / "cache"
    tcache.reset_memory()
    lookup.forget()


@pytest.fixture
def spec():
    return gspngen.load_spec(GSPN4)


def inputs(spec, shape=SMALL, requires_grad=False):
    inp = make_inputs(spec, *shape, dtype=torch.float32, requires_grad=requires_grad)
    return [inp[k] for k in ARGS]


class Scaled(ReferenceBackend):
    """Wrong on purpose: the reference times 1.5."""

    name = "scaled"

    def forward(self, spec, x, w, lam, u, s, m):
        y, saved = super().forward(spec, x, w, lam, u, s, m)
        return y * 1.5, saved


class Raises(ReferenceBackend):
    name = "raises"

    def forward(self, spec, x, w, lam, u, s, m):
        raise RuntimeError("kaboom: launch failed")


class Configs(ReferenceBackend):
    """The reference behind three configs; 'k=2' is wrong, so it must be rejected."""

    name = "configs"

    def __init__(self, key=""):
        self.key = key

    def candidates(self, spec, dtype, pass_, shape):
        return ["", "k=1", "k=2"]

    def with_config(self, fwd="", bwd=""):
        return Configs(fwd)

    def forward(self, spec, x, w, lam, u, s, m):
        y, saved = super().forward(spec, x, w, lam, u, s, m)
        return (y + 1.0 if self.key == "k=2" else y), saved


@pytest.fixture
def fakes():
    for name, cls in (("scaled", Scaled), ("raises", Raises), ("configs", Configs)):
        register_backend(name, cls)
    yield
    for name in ("scaled", "raises", "configs"):
        unregister_backend(name)


# -- real tuning on CPU -----------------------------------------------------------------------------------------

def test_real_tuning_on_cpu_stores_a_winner_that_auto_uses(spec, cache_dir):
    report = tune(spec, SMALL, "fp32", budget_s=0.05)
    assert report["stored"] is True
    fwd, bwd = (report["entries"][report["keys"][p]] for p in ("fwd", "bwd"))
    for entry in (fwd, bwd):
        cands = entry["candidates"]
        assert cands["reference"]["status"] == "ok" and cands["lowered"]["status"] == "ok"
        assert cands["reference"]["reps"] >= 3 and cands["reference"]["median_ms"] > 0
        assert "interpreter" in cands["triton"]["reason"]  # a test device, never tuned
        assert cands["cuda"]["status"] == "rejected"
        assert "cuda_per_step" not in cands  # a benchmark baseline
        # the CPU backend's configs compete too where a compiler is there
        assert cands[entry["winner"]]["status"] == "ok"
        assert entry["default"] == default_backend(spec, "cpu", torch.float32)
    on_disk = json.loads(tcache.path_for(report["device_id"]).read_text())
    assert set(on_disk["entries"]) == set(report["keys"].values())
    # a fresh process state reads it back: auto runs the stored winner, per inference / training
    tcache.reset_memory()
    lookup.forget()
    op = gspngen.compile(spec)
    x = inputs(spec)[0]
    assert op.resolve_backend(x) == select.choose(fwd, None, training=False) == fwd["winner"]
    assert op.resolve_backend(x, training=True) == select.choose(fwd, bwd, training=True)
    args = inputs(spec)
    torch.testing.assert_close(op(*args), gspngen.compile(spec, backend="reference")(*args))


def test_wrong_and_raising_candidates_are_rejected_and_tuning_goes_on(spec, fakes):
    report = tune(spec, SMALL, "fp32", passes=["fwd"], budget_s=0.02,
                  backends=["reference", "scaled", "raises", "configs"])
    entry = report["entries"][report["keys"]["fwd"]]
    c = entry["candidates"]
    assert c["scaled"]["status"] == "rejected" and "wrong result" in c["scaled"]["reason"]
    assert "median_ms" not in c["scaled"]  # never timed
    assert c["raises"]["status"] == "rejected" and "kaboom" in c["raises"]["reason"]
    assert c["configs@k=2"]["status"] == "rejected" and "wrong result" in c["configs@k=2"]["reason"]
    assert c["configs"]["status"] == c["configs@k=1"]["status"] == c["reference"]["status"] == "ok"
    assert entry["winner"] in ("reference", "configs", "configs@k=1")


def test_wrong_backward_is_rejected(spec):
    class BadGrad(ReferenceBackend):
        name = "badgrad"

        def backward(self, spec, gy, x, w, lam, u, s, m, saved):
            g = list(super().backward(spec, gy, x, w, lam, u, s, m, saved))
            g[2] = torch.zeros_like(g[2])
            return tuple(g)

    register_backend("badgrad", BadGrad)
    try:
        report = tune(spec, SMALL, "fp32", passes=["bwd"], budget_s=0.02, backends=["reference", "badgrad"])
    finally:
        unregister_backend("badgrad")
    c = report["entries"][report["keys"]["bwd"]]["candidates"]
    assert c["badgrad"]["status"] == "rejected" and "gradient of lam" in c["badgrad"]["reason"]
    assert c["reference"]["status"] == "ok"


def test_cropped_verification_catches_a_wrong_channel(spec):
    """Above verify_full_max the reference runs on batch 1 and the first channels only."""
    from gspngen.tune.tuner import crop_plan

    assert crop_plan(spec, (2, 16, 8, 8), full_max=100) == (1, 8, 8)  # per-channel weights: 8 channels
    shared = Spec.from_dict({"name": "s", "weight_groups": "shared"})
    assert crop_plan(shared, (2, 16, 8, 8), full_max=100) == (1, 16, 1)  # one group: all its channels

    class FirstChannelWrong(ReferenceBackend):
        name = "firstwrong"

        def forward(self, spec, x, w, lam, u, s, m):
            y, saved = super().forward(spec, x, w, lam, u, s, m)
            y = y.clone()
            y[0, 0] += 1.0
            return y, saved

    register_backend("firstwrong", FirstChannelWrong)
    try:
        report = tune(spec, (2, 16, 8, 8), "fp32", passes=["fwd"], budget_s=0.02,
                      backends=["reference", "firstwrong"], verify_full_max=100)
    finally:
        unregister_backend("firstwrong")
    c = report["entries"][report["keys"]["fwd"]]["candidates"]
    assert c["reference"]["status"] == "ok"
    assert c["firstwrong"]["status"] == "rejected" and "wrong result" in c["firstwrong"]["reason"]


# -- replay and selection ------------------------------------------------------------------------------------------

def gpu_timings(**extra):
    return {"spec": str(GSPN4), "device": H200, "runs": [
        {"shape": [16, 8, 1024, 1024], "dtype": "bf16", "pass": "fwd", "default": "cuda", "candidates": {
            "cuda": {"median_ms": 1.30, "spread": 0.01, "reps": 30},
            "cuda@v=1": {"median_ms": 1.10, "spread": 0.02, "reps": 30},
            "cuda@v=2": {"rejected": "needs 300000 bytes of shared memory"},
            "triton@bc=4,nw=4,ns=2": {"median_ms": 1.05},
            "reference": {"median_ms": 900.0}}},
        {"shape": [16, 8, 1024, 1024], "dtype": "bf16", "pass": "bwd", "default": "cuda", "candidates": {
            "cuda": {"median_ms": 2.0}, "cuda@v=3": {"median_ms": 1.8},
            "triton": {"median_ms": 2.6}, "reference": {"median_ms": 5000.0}}},
    ], **extra}


def test_replay_selects_on_recorded_gpu_timings(spec, cache_dir):
    report = replay(gpu_timings())
    assert report["stored"] is True
    entries = list(report["entries"].values())
    fwd = next(e for e in entries if e["key"]["pass"] == "fwd")
    bwd = next(e for e in entries if e["key"]["pass"] == "bwd")
    assert fwd["winner"] == "triton@bc=4,nw=4,ns=2" and bwd["winner"] == "cuda@v=3"
    # inference: the fastest forward; training: one backend for both passes, by fwd + bwd time
    assert select.choose(fwd, bwd, training=False) == "triton@bc=4,nw=4,ns=2"
    assert select.choose(fwd, bwd, training=True) == "cuda@v=1|v=3"  # 1.10 + 1.8 < 1.05 + 2.6
    assert fwd["key"]["bucket"] == "nc128-h1024-w1024" and fwd["key"]["dtype"] == "bf16"
    table = json.loads((cache_dir / "autotune" / f"{report['device_id']}.json").read_text())
    assert table["device"] == H200 and report["device_id"].startswith("cuda-nvidia-h200-cc9.0-132sm")


def test_a_new_candidate_keeps_the_old_timings(spec):
    replay(gpu_timings())
    more = {"spec": str(GSPN4), "device": H200, "runs": [
        {"shape": [16, 8, 1000, 1000], "dtype": "bf16", "pass": "fwd",  # same bucket
         "candidates": {"cpu@cb=8,tile=32": {"median_ms": 0.9}}}]}
    report = replay(more)
    (entry,) = report["entries"].values()
    assert set(entry["candidates"]) == {"cuda", "cuda@v=1", "cuda@v=2", "triton@bc=4,nw=4,ns=2", "reference",
                                        "cpu@cb=8,tile=32"}
    assert entry["candidates"]["cuda@v=1"]["median_ms"] == 1.10
    assert entry["winner"] == "cpu@cb=8,tile=32"


def test_replay_rejects_malformed_timings(spec):
    with pytest.raises(ValueError, match=r"runs\[0\].shape"):
        replay({"spec": str(GSPN4), "runs": [{"shape": [1, 2], "candidates": {"a": {"median_ms": 1}}}]})
    with pytest.raises(ValueError, match="median_ms"):
        replay({"spec": str(GSPN4), "runs": [{"shape": [1, 2, 3, 4], "candidates": {"a": {"ms": 1}}}]})


def test_selection_ties_and_no_winner():
    assert select.winner({}) is None
    assert select.winner({"b": {"backend": "b", "status": "ok", "median_ms": 1.0},
                          "a": {"backend": "a", "status": "ok", "median_ms": 1.0}}) == "a"
    rejected = {"candidates": {"a": {"backend": "a", "status": "rejected", "reason": "x"}}}
    assert select.choose(rejected, None, training=False) is None


# -- keys ---------------------------------------------------------------------------------------------------------

def test_bucketing():
    assert tkeys.shape_bucket((2, 8, 33, 64)) == "nc16-h64-w64"
    assert tkeys.shape_bucket((1, 16, 60, 64)) == "nc16-h64-w64"  # exact N*C, H and W rounded up to 2^k
    assert tkeys.shape_bucket((1, 16, 65, 64)) != tkeys.shape_bucket((1, 16, 64, 64))
    assert tkeys.shape_bucket((1, 8, 64, 64)) != tkeys.shape_bucket((1, 16, 64, 64))


def test_key_sensitivity_every_part_is_a_miss(spec, monkeypatch):
    replay({"spec": str(GSPN4), "device": "cpu", "runs": [
        {"shape": list(SMALL), "dtype": "fp32", "pass": "fwd",
         "candidates": {"lowered": {"median_ms": 1.0}, "reference": {"median_ms": 2.0}}}]})
    cpu = torch.device("cpu")

    def hit(s=spec, dtype="fp32", shape=SMALL):
        tcache.reset_memory()
        return lookup.decide(s, cpu, dtype, shape, False, tune_on_miss=False)

    assert hit() == "lowered"
    other = Spec.from_dict({**spec.to_dict(), "connection": 5})
    assert hit(s=other) is None
    assert hit(dtype="fp64") is None
    assert hit(shape=(1, 4, 8, 16)) is None
    assert hit(shape=(1, 4, 7, 5)) == "lowered"  # same bucket
    for target, name, value in ((gspngen, "__version__", "9.9.9"),
                                (tkeys, "generator_hash", lambda: "another-template"),
                                (tkeys, "toolchain", lambda t: (("torch", "0.0"),))):
        with monkeypatch.context() as mp:
            mp.setattr(target, name, value)
            assert hit() is None, name
    assert hit() == "lowered"


def test_same_key_in_a_new_process_is_a_hit_without_tuning(spec, cache_dir):
    replay({"spec": str(GSPN4), "device": "cpu", "runs": [
        {"shape": list(SMALL), "dtype": "fp32", "pass": "fwd",
         "candidates": {"lowered": {"median_ms": 1.0}, "reference": {"median_ms": 2.0}}}]})
    path = next((cache_dir / "autotune").glob("*.json"))
    before = path.stat().st_mtime_ns
    code = textwrap.dedent(f"""
        import torch, gspngen
        import gspngen.tune.tuner as tuner
        def boom(*a, **k):
            raise SystemExit("tuned although the cache holds the key")
        tuner.tune = boom
        op = gspngen.compile({str(GSPN4)!r}, autotune=True)
        x = torch.zeros({SMALL!r})
        print(op.resolve_backend(x))
    """)
    env = {**os.environ, "GSPNGEN_AUTOTUNE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lowered"
    assert path.stat().st_mtime_ns == before


# -- run-time use ----------------------------------------------------------------------------------------------------

def lowered_wins(shape=SMALL):
    replay({"spec": str(GSPN4), "device": "cpu", "runs": [
        {"shape": list(shape), "dtype": "fp32", "pass": p,
         "candidates": {"lowered": {"median_ms": 1.0}, "reference": {"median_ms": 2.0}}} for p in ("fwd", "bwd")]})


def test_auto_uses_cache_and_off_is_deterministic(spec, monkeypatch):
    lowered_wins()
    op = gspngen.compile(spec)
    args = inputs(spec)
    assert op.resolve_backend(args[0]) == "lowered"
    y = op(*args)
    monkeypatch.setenv("GSPNGEN_AUTOTUNE", "off")
    assert op.resolve_backend(args[0]) == default_backend(spec, "cpu", torch.float32)
    torch.testing.assert_close(op(*args), y)
    monkeypatch.setenv("GSPNGEN_AUTOTUNE", "sometimes")
    with pytest.raises(ValueError, match="GSPNGEN_AUTOTUNE"):
        op(*args)


def test_miss_runs_the_default_without_tuning(spec, monkeypatch):
    import gspngen.tune.tuner as tuner

    monkeypatch.setattr(tuner, "tune", lambda *a, **k: pytest.fail("tuned in the hot path"))
    op = gspngen.compile(spec)
    args = inputs(spec)
    assert op.resolve_backend(args[0]) == default_backend(spec, "cpu", torch.float32)
    op(*args)


@pytest.mark.parametrize("how", ["compile", "env"])
def test_autotune_tunes_on_first_call_and_stores(spec, monkeypatch, cache_dir, how, fakes):
    import gspngen.tune.tuner as tuner

    calls = []
    real = tuner.tune

    def counting(*a, **k):
        calls.append(a[3] if len(a) > 3 else k.get("passes"))
        return real(*a, budget_s=0.02, backends=["reference", "configs"], **k)

    monkeypatch.setattr(tuner, "tune", counting)
    if how == "env":
        monkeypatch.setenv("GSPNGEN_AUTOTUNE", "1")
    op = gspngen.compile(spec, autotune=(how == "compile"))
    args = inputs(spec, requires_grad=True)
    op(*args).sum().backward()  # training: both passes tuned at once
    op(*args)
    assert calls == [["fwd", "bwd"]]
    assert args[0].grad is not None
    from gspngen.backends import split_backend_name

    base, fwd_key, _ = split_backend_name(op.resolve_backend(args[0]))
    assert base in ("reference", "configs") and fwd_key != "k=2"  # the wrong forward config is never run
    table = json.loads(next((cache_dir / "autotune").glob("*.json")).read_text())
    assert {e["key"]["pass"] for e in table["entries"].values()} == {"fwd", "bwd"}


def test_autotune_needs_auto(spec):
    with pytest.raises(ValueError, match="autotune"):
        gspngen.compile(spec, backend="reference", autotune=True)


def test_torch_compile_fullgraph_with_a_cached_winner(spec):
    lowered_wins()
    op = gspngen.compile(spec)
    args = inputs(spec)
    want = gspngen.compile(spec, backend="lowered")(*args)
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: op(*a) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(*args), want * 2)


def test_hot_path_direct_call_matches_the_custom_op(spec):
    """Without autograd the op calls the backend directly; with it, the custom op: same values, gradients."""
    op = gspngen.compile(spec, backend="reference")
    args = inputs(spec)
    y_direct = op(*args)
    y_op, _ = torch.ops.gspngen.scan(*args, spec.to_json(), "reference")
    torch.testing.assert_close(y_direct, y_op)
    g = inputs(spec, requires_grad=True)
    y = op(*g)
    assert y.grad_fn is not None
    y.sum().backward()
    assert all(t.grad is not None for t in g if t is not None)
    with pytest.raises(ValueError, match="x: expected shape|w: expected shape"):
        op(args[0][:, :2], *args[1:])  # a new signature is validated again


# -- ranks ---------------------------------------------------------------------------------------------------------

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    import gspngen
    import gspngen.tune.tuner as tuner

    rank = int(sys.argv[1])
    os.environ["GSPNGEN_CACHE_DIR"] = sys.argv[3 + rank]
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method="tcp://127.0.0.1:" + sys.argv[2])
    timed = []
    real = tuner.tune
    def counting(*a, **k):
        timed.append(1)
        return real(*a, budget_s=0.02, **k)
    tuner.tune = counting
    spec = gspngen.load_spec(sys.argv[5])
    op = gspngen.compile(spec, autotune=True)
    from gspngen.testing import make_inputs
    inp = make_inputs(spec, 1, 4, 8, 8, dtype=torch.float32)
    op(*[inp[k] for k in ("x", "w", "lam", "u", "s", "m")])
    print(json.dumps({"rank": rank, "timed": len(timed),
                      "choice": op.resolve_backend(inp["x"])}))
    dist.destroy_process_group()
""")


def test_two_gloo_ranks_run_rank_zeros_choice(spec, tmp_path, monkeypatch):
    import socket

    # rank 1's own cache says 'lowered'; rank 0's is empty, so rank 0 tunes and its choice must win
    c0, c1 = tmp_path / "c0", tmp_path / "c1"
    with monkeypatch.context() as mp:
        mp.setenv("GSPNGEN_CACHE_DIR", str(c1))
        tcache.reset_memory()
        replay({"spec": str(GSPN4), "device": "cpu", "runs": [
            {"shape": [1, 4, 8, 8], "dtype": "fp32", "pass": "fwd",
             "candidates": {"lowered": {"median_ms": 0.001}, "reference": {"median_ms": 1e9}}}]})
    tcache.reset_memory()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, str(c0), str(c1), str(GSPN4)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    r0, r1 = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    assert r0["timed"] == 1 and r1["timed"] == 0
    assert r0["choice"] == r1["choice"]
    assert not (c1 / "autotune").exists() or len(list((c1 / "autotune").glob("*.json"))) == 1


# -- command line ----------------------------------------------------------------------------------------------------

def test_cli_autotune_then_cache_show(capsys, cache_dir):
    from gspngen.cli import main

    assert main(["autotune", str(GSPN4), "--shape", "1,8,32,32", "-q"]) == 0
    out = capsys.readouterr().out
    assert "winner:" in out and "x default" in out and "rejected: needs a CUDA device" in out
    assert main(["cache", "show"]) == 0
    shown = capsys.readouterr().out
    assert "gspn4" in shown and "nc8-h32-w32" in shown and "2 entries" in shown


def test_cli_replay_and_json(tmp_path, capsys):
    from gspngen.cli import main

    timings = tmp_path / "timings.json"
    timings.write_text(json.dumps({"spec": str(GSPN4), "device": "cpu", "runs": [
        {"shape": [1, 4, 8, 8], "dtype": "fp32", "pass": "fwd",
         "candidates": {"lowered": {"median_ms": 1.0}, "reference": {"median_ms": 3.0}}}]}))
    assert main(["autotune", "--replay", str(timings), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "winner: lowered" in out and "3.00" in out  # speedup of lowered over the default
    assert json.loads((tmp_path / "r.json").read_text())["reports"][0]["replayed"] is True


@pytest.mark.parametrize("argv, option", [
    (["autotune", str(GSPN4)], "--shape"),
    (["autotune", str(GSPN4), "--shape", "1,8,32"], "--shape"),
    (["autotune", str(GSPN4), "--shape", "1,8,8,8", "--dtype", "fp8"], "--dtype"),
    (["autotune", str(GSPN4), "--shape", "1,8,8,8", "--pass", "sideways"], "--pass"),
    (["autotune", str(GSPN4), "--shape", "1,8,8,8", "--backend", "nope"], "--backend"),
    (["autotune", str(GSPN4), "--shape", "1,8,8,8", "--budget-s", "0"], "--budget-s"),
    (["autotune", "--replay", "/nonexistent/t.json"], "--replay"),
    (["cache", "frobnicate"], "ACTION"),
    (["cache", "export"], "FILE"),
    (["cache", "show", "extra"], "FILE"),
])
def test_cli_errors_are_one_line_exit_2(capsys, argv, option):
    from gspngen.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err


# -- the config protocol of the kernel backends (pure Python: no GPU needed) ------------------------------------------

def test_triton_config_keys(spec):
    from gspngen.backends import get_backend
    from gspngen.backends.triton import config_key
    from gspngen.runtime.triton_launch import DEFAULT_CONFIG, TritonConfig
    from gspngen.spec import Spec

    t = get_backend("triton")
    keys = t.candidates(spec, "fp32", "fwd", (2, 16, 64, 64))
    assert keys[0] == "" and len(keys) == len(set(keys)) > 3
    b = get_backend("triton@bc=8,nw=2,ns=1|bc=1,nw=8,ns=3")
    assert b.config == TritonConfig(8, 2, 1) and b.bwd_config == TritonConfig(1, 8, 3)
    assert get_backend("triton@bc=2,nw=4,ns=2").bwd_config == DEFAULT_CONFIG
    # step tiles: an optional st field, written only when not 1, and candidates that use them
    assert get_backend("triton@bc=1,nw=4,ns=2,st=4").config == TritonConfig(1, 4, 2, steps=4)
    assert config_key(TritonConfig(1, 4, 2, steps=4)) == "bc=1,nw=4,ns=2,st=4" and config_key(DEFAULT_CONFIG) == "bc=4,nw=4,ns=2"
    assert any(k.endswith(",st=4") for k in keys)
    nhwc = Spec.from_dict({**spec.to_dict(), "layout": "nhwc"})
    assert not any(k.endswith(",st=4") for k in t.candidates(nhwc, "fp32", "fwd", (2, 16, 64, 64)))  # no lr/rl rows
    for bad in ("bc=3,nw=4,ns=2", "bc=4,nw=4", "tile=4", "bc=4,nw=4,ns=2,st=2", "bc=4,nw=4,ns=2,st=4,x=1"):
        with pytest.raises(ValueError, match="backend"):
            t.with_config(bad)


def test_cuda_config_keys_pick_the_ith_candidate(spec):
    from gspngen.backends import get_backend
    from gspngen.render import cuda as rc

    c = get_backend("cuda")
    keys = c.candidates(spec, "fp32", "fwd", (1, 8, 32, 32))
    # concurrent directions, (nchw with lr/rl) transposed left/right scans and (planes that fit on chip)
    # the on-chip forward: one more key each
    extra = ((["cc=1"] if c.concurrency_applies(spec, "fwd") else []) + (["tr=1"] if c.transpose_applies(spec) else [])
             + (["oc=1"] if rc.onchip_plan(spec, "fp32", 32, 32) is not None else []))
    assert keys[0] == "" and keys[1:1 + len(extra)] == extra
    # then the cluster (cl=N) and one-launch (ml=1) keys, then v=1, v=2, ...
    split = [k for k in keys[1 + len(extra):] if not k.startswith("v=")]
    assert all(k.startswith(("cl=", "ml=")) for k in split)
    assert keys[1 + len(extra) + len(split):] == [f"v={i}" for i in range(1, len(keys) - len(extra) - len(split))]
    tuned = get_backend("cuda@v=2|v=1")
    assert tuned.concurrent == () and get_backend("cuda@v=2,cc=1|cc=1").concurrent == ("fwd", "bwd")
    d = spec.directions[0]
    assert tuned.configs(spec, "fp32", d, "fwd", 8, 32, 32) == rc.candidate_configs(spec, "fp32", d, "fwd", 8, 32, 32)[2]
    assert tuned.configs(spec, "fp32", d, "bwd", 8, 32, 32) == rc.candidate_configs(spec, "fp32", d, "bwd", 8, 32, 32)[1]
    assert get_backend("cuda@v=99").configs(spec, "fp32", d, "fwd", 8, 32, 32) is None  # fewer: the default
    with pytest.raises(ValueError, match="backend"):
        c.with_config("x=1")
    assert c.unavailable_reason(torch.device("cpu")) == "needs a CUDA device"


def test_triton_interpreter_runs_a_tuned_key(spec):
    """A config key reaches the Triton launch (under the CPU interpreter, outside tuning)."""
    op = gspngen.compile(spec, backend="triton@bc=1,nw=2,ns=1|bc=2,nw=2,ns=1")
    args = inputs(spec, shape=(1, 4, 4, 4))
    ref = gspngen.compile(spec, backend="reference")(*args)
    torch.testing.assert_close(op(*args), ref, rtol=1e-4, atol=1e-4)


def test_replay_of_cuda_without_a_gpu_says_what_to_give():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="identity object"):
        replay({"spec": str(GSPN4), "device": "cuda", "runs": []})


def test_verification_poisons_triton_outputs(spec, monkeypatch):
    """An element a kernel forgets to write is NaN during verification, so the candidate is rejected."""
    from gspngen.backends.triton import TritonBackend
    from gspngen.tune.candidates import Candidate
    from gspngen.tune.tuner import _Trusted, verify

    real = TritonBackend.forward

    def forgetful(self, spec, *a):
        y, saved = real(self, spec, *a)
        out = self._launch.new_output(tuple(y.shape), y.dtype, y.device)  # the backend's allocation hook
        out.view(-1)[1:] = y.reshape(-1)[1:]  # element 0 never written
        return out, saved

    monkeypatch.setattr(TritonBackend, "forward", forgetful)
    args = inputs(spec, shape=(1, 4, 4, 4))
    gy = torch.randn_like(args[0])
    why = verify(spec, Candidate("triton"), "fwd", args, gy, _Trusted(spec, args, gy, None), "fp32")
    assert why is not None and "non-finite" in why


def test_overhead_benchmark_runs(tmp_path):
    out = tmp_path / "overhead.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "op_overhead.py"), "--calls", "50", "--repeats", "2",
                        "--json", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["op_auto_cache_hit_us"] > 0 and res["backend_us"] > 0
