"""scripts/gpu_probe.py (device_check's per-launch stage), run through the CPU emulator: it must time
exactly the launches the backend makes, one per direction and pass, for the default and a tuning."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cuda_emu.emulator import RR, EmuRunner
from gspngen.backends.cuda import CudaBackend
from gspngen.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def _load_probe():
    spec = importlib.util.spec_from_file_location("gpu_probe", ROOT / "scripts" / "gpu_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def runner():
    r = EmuRunner(order=RR, sm_count=2, opt="-O0")
    yield r
    r.close()


@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
def test_probe_times_every_launch(runner, pass_):
    probe = _load_probe()
    spec = load_spec(ROOT / "examples" / "gspn4.yaml")
    shape = (1, 2, 8, 8)
    variants = CudaBackend().candidates(spec, "fp32", pass_, shape)
    assert variants[0] == "" and len(variants) > 1
    args, gy = probe.make_args(spec, shape, "fp32", "cpu")
    picks = [variants[0], variants[-1], "ml=1"] + (["tr=1", "oc=1"] if pass_ == "fwd" else [])
    assert {"ml=1"} <= set(variants) and (pass_ == "bwd" or {"tr=1", "oc=1"} <= set(variants))
    for v in picks:
        ms = probe.probe(spec, args, gy, v, pass_, 1, runner)
        # one timed launch per direction, tr=1's transposes summed, oc=1's and ml=1's one launch, then the
        # whole pass
        one = {"oc=1": "onchip", "ml=1": "one launch"}.get(v)
        want = ({one} if one else set(range(spec.num_directions))) | {"all"} | (
            {"transpose"} if v == "tr=1" else set())
        assert set(ms) == want and all(t > 0 for t in ms.values())
        assert ms["all"] >= max(t for k, t in ms.items() if k != "all")


def test_probe_rejects_zero_reps(runner):
    with pytest.raises(SystemExit):
        _load_probe().main([str(ROOT / "examples" / "gspn4.yaml"), "--reps", "0"], runner=runner, device="cpu")


def test_probe_needs_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU path is not taken")
    assert _load_probe().main([str(ROOT / "examples" / "gspn4.yaml")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_probe_main_writes_rows(runner, tmp_path):
    import json

    out = tmp_path / "probe.json"
    rc = _load_probe().main([str(ROOT / "examples" / "gspn4.yaml"), "--shapes", "1,2,8,8", "--dtypes", "fp32",
                             "--reps", "1", "--variants", "default", "--json", str(out)], runner=runner, device="cpu")
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["pass"], r["direction"]) for r in rows] == [(p, d) for p in ("fwd", "bwd")
                                                          for d in ("lr", "rl", "tb", "bt", "all")]
    assert rows[0]["threads"] and rows[4]["threads"] is None  # the pass row has no tiling
    assert all(r["ms"] > 0 and r["steps"] == 8 for r in rows)
    assert all(isinstance(r["predicted_ms"], float) for r in rows)  # the static model ran beside
