"""Time every launch of the fused CUDA kernels on their own, per direction and tuning (a device_check stage).

`gspngen bench` times whole passes; the static model (gspngen/perfmodel.py)
predicts each launch. The two H200 runs of 2026-12-04 measured 21 ms forward
and 95 ms backward at the paper shape, about 4x and 11x the model's bound
for an H200 (5.0 / 8.6 ms; bench.log quotes the H100 model: 7.2 / 12.3), with the
same times in fp32 and bf16 (so bytes are not the limit) and a time per step
that grows with the lanes a block owns. Which launch (lr/rl with their strided
rows, or tb/bt) and which tuning holds the time cannot be read from pass
totals: this script records a CUDA event before and after each launch of a
pass (the backend's own launches, unchanged), for every tuning the autotuner
would try (``v=i``), and prints measured ms, ms per scan step and the model's
prediction for the same launch side by side. Each (shape, dtype) row is
printed as soon as it is measured, so a stage cut short keeps what it did.

Usage (repository root, PYTHONPATH=.): python scripts/gpu_probe.py [SPEC] [--shapes N,C,H,W ...] [--dtypes fp32 bf16] [--reps 5]
       [--variants all|default] [--no-static] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(v) for v in text.split(","))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape: expected N,C,H,W of positive integers, got {text!r}")
    return parts  # type: ignore[return-value]


class _HostEvent:
    """perf_counter stand-in for torch.cuda.Event (the probe under the CPU emulator, in tests)."""

    def __init__(self, **_):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


class EventRunner:
    """Wraps the backend's runner: an event pair around every launch, in launch order."""

    def __init__(self, inner, event_type):
        self.inner = inner
        self.event_type = event_type
        self.events = []
        self.names = {}  # id of a kernel handle -> its name expression

    def kernel(self, device, source, name, names):
        k = self.inner.kernel(device, source, name, names)
        self.names[id(k)] = name
        return k

    def limits(self, device):
        return self.inner.limits(device)

    def clusters(self, device):
        return self.inner.clusters(device)

    def launch(self, kernel, device, grid, block, smem, args):
        start, end = self.event_type(enable_timing=True), self.event_type(enable_timing=True)
        start.record()
        self.inner.launch(kernel, device, grid, block, smem, args)
        end.record()
        self.events.append((_label(args, self.names.get(id(kernel), "")), start, end))


def _label(args, name: str = ""):
    """The direction index of a fused launch (its "d" argument); for a launch of every direction (d = -1)
    "onchip" (oc=1) or "one launch" (ml=1); else "transpose" (tr=1's plane transposes)."""
    from gspngen.render.cuda import PARAMS

    for kind in ("fwd", "bwd"):
        if len(args) == len(PARAMS[kind]):
            d = int(args[PARAMS[kind].index(("i32", "d"))][1])
            return ("onchip" if "_oc<" in name else "one launch") if d < 0 else d
    return "transpose"


def make_args(spec, shape, dname, device):
    """The call's inputs and an output gradient on the device, built as the autotuner builds them (one small
    tile drawn on the host, repeated on the device: drawing billions of values on the host takes minutes)."""
    import torch

    from gspngen.tune.timing import _prepare_copies, base_inputs

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dname]
    copies, gys = _prepare_copies(spec, shape, dtype, torch.device(device), base_inputs(spec, shape), 1, 0)
    return [copies[0][k] for k in ("x", "w", "lam", "u", "s", "m")], gys[0]


def probe(spec, args, gy, variant, pass_, reps, runner):
    """Median ms over ``reps`` calls after a warm-up call, by launch: direction index -> its launch,
    "transpose" -> tr=1's transposes summed, "all" -> the whole pass on the caller's stream.
    On a GPU each call is queued behind a short spin kernel, so the events time the kernels, not the
    host's launch work; on the CPU (an emulator runner, in tests) the host clock is used."""
    import torch

    from gspngen.backends.cuda import CudaBackend

    on_gpu = args[0].is_cuda
    er = EventRunner(runner, torch.cuda.Event if on_gpu else _HostEvent)
    be = CudaBackend(er).with_config(**{pass_: variant})
    saved = be.forward(spec, *args)[1] if pass_ == "bwd" else None
    per_launch = []
    event = torch.cuda.Event if on_gpu else _HostEvent
    for rep in range(reps + 1):
        er.events.clear()
        if on_gpu and rep:
            from gspngen.tune.timing import _queue_ahead

            _queue_ahead(args[0].device, 2.0)
        start, end = event(enable_timing=True), event(enable_timing=True)
        start.record()
        if pass_ == "fwd":
            be.forward(spec, *args)
        else:
            be.backward(spec, gy, *args, saved)
        end.record()  # the whole pass on the caller's stream (launches on side streams included: cc=1)
        if on_gpu:
            torch.cuda.synchronize()
        if rep:  # the first call builds and warms up
            per = {}
            for label, s, e in er.events:  # a direction's launch; every transpose of the pass summed
                per[label] = per.get(label, 0.0) + s.elapsed_time(e)
            per["all"] = start.elapsed_time(end)
            per_launch.append(per)
    return {k: statistics.median(p[k] for p in per_launch) for k in per_launch[0]}


def main(argv=None, runner=None, device: str = "cuda") -> int:
    """``runner``/``device``: tests pass the CPU emulator and "cpu"; by default CuPy on the GPU."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="examples/gspn4.yaml")
    ap.add_argument("--shapes", nargs="+", type=parse_shape,
                    default=[(16, 8, 1024, 1024), (1, 16, 128, 128), (1, 128, 512, 512)])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", choices=("all", "default"), default="all",
                    help="every tuning the autotuner would try (fp32), or the default only")
    ap.add_argument("--gpu", default="h200", help="the GPU the static model predicts for")
    ap.add_argument("--no-static", action="store_true",
                    help="leave the static model out (it builds every kernel again for ptxas and cuobjdump)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps: expected at least 1 timed call, got {args.reps}")

    import torch

    from gspngen.atomic import write_file_atomically
    from gspngen.backends.cuda import CudaBackend, transposed_as
    from gspngen.geometry import DIRECTION_TABLE
    from gspngen.runtime.cuda_build import default_runner
    from gspngen.spec import load_spec

    if runner is None and not torch.cuda.is_available():
        print("gpu_probe: no CUDA device; nothing measured", file=sys.stderr)
        return 2
    spec = load_spec(args.spec)
    runner = runner or default_runner()
    gpu_name = torch.cuda.get_device_name(0) if device == "cuda" else f"{device} (emulated)"
    rows = []
    print("shape            dtype pass variant dir       threads vec nseg P B stage  steps       ms  us/step  predicted_ms")
    # Defaults first (every shape and dtype), then the other tunings of the first dtype shape by shape, so a
    # stage cut short has the most telling rows; each tuning set costs one NVRTC build (seconds).
    jobs = [(shape, dname, "") for shape in args.shapes for dname in args.dtypes]
    if args.variants == "all":
        jobs += [(shape, args.dtypes[0], v) for shape in args.shapes
                 for v in dict.fromkeys(CudaBackend().candidates(spec, args.dtypes[0], "fwd", shape)[1:]
                                        + CudaBackend().candidates(spec, args.dtypes[0], "bwd", shape)[1:])]
    inputs_for = {}
    for shape, dname, v in jobs:
        N, C, H, W = shape
        if (shape, dname) not in inputs_for:
            inputs_for.clear()  # one shape's inputs at a time on the device
            if device == "cuda":
                torch.cuda.empty_cache()
            inputs_for[(shape, dname)] = make_args(spec, shape, dname, device)
        call_args, gy = inputs_for[(shape, dname)]
        for p in ("fwd", "bwd"):
            if v and v not in CudaBackend().candidates(spec, dname, p, shape):
                continue
            t0 = time.time()
            try:
                ms = probe(spec, call_args, gy, v, p, args.reps, runner)
            except Exception as exc:  # out of memory, a tuning that does not fit: say so, go on
                print(f"{shape} {dname} {p} {v or 'default'}: {type(exc).__name__}: {exc}"[:300], flush=True)
                continue
            be = CudaBackend(runner=object()).with_config(**{p: v})
            pred = {}
            if not args.no_static:
                try:
                    from gspngen.perfmodel import static_figures

                    st = static_figures(spec, dname, shape, args.gpu, configs=be.configs, transposed=be.transposed,
                                       onchip=be.onchip, concurrent=be.concurrent, one_launch=be.one_launch)
                    sp = st["forward" if p == "fwd" else "backward"]
                    pred = {}
                    for k in sp["kernels"]:  # the model's transpose launches summed as the probe sums them
                        key = "transpose" if "transpose" in k["direction"] else k["direction"]
                        pred[key] = pred.get(key, 0.0) + k["predicted_ms"]
                    pred["all"] = sp["predicted_ms"]
                except Exception:  # no NVRTC or cuobjdump: measured figures only
                    pass
            smem_limit = runner.limits(torch.device("cuda"))[1]
            for key in sorted(ms, key=lambda k: (isinstance(k, str), k == "all", str(k))):
                direction = spec.directions[key] if isinstance(key, int) else key
                cfg, steps = None, max(H, W)
                if isinstance(key, int):
                    # tr=1 runs left/right forward scans as top/bottom ones on transposed planes
                    side = DIRECTION_TABLE[direction].step_axis == "W"
                    moved = (side and (be.transposed if p == "fwd" else be.transposed_bwd)
                             and be.transpose_applies(spec, p, dname, C))
                    as_dir = transposed_as(direction) if moved else direction
                    cfg = be.config(spec, dname, as_dir, p, C, *((W, H) if moved else (H, W)), smem_limit)
                    steps = W if side else H
                row = {"shape": list(shape), "dtype": dname, "pass": p, "variant": v or "default",
                       "direction": direction, "steps": steps, "ms": ms[key], "us_per_step": ms[key] * 1e3 / steps,
                       "predicted_ms": pred.get(direction)}
                for k in ("threads", "vec", "nseg", "prefetch", "bufs", "stage", "cluster", "ring"):
                    row[k] = None if cfg is None else getattr(cfg, k)
                rows.append(row)
                pm = row["predicted_ms"]
                geo = ("      -   -    - - - -    " if cfg is None else
                       f"{cfg.threads:7d} {cfg.vec:3d} {cfg.nseg:4d} {cfg.prefetch} {cfg.bufs} {str(cfg.stage):5s}")
                print(f"{','.join(map(str, shape)):16s} {dname:5s} {p:4s} {row['variant']:7s} {direction:9s} {geo} "
                      f"{steps:6d} {row['ms']:8.3f} {row['us_per_step']:8.3f}  {'-' if pm is None else f'{pm:.3f}'}",
                      flush=True)
            print(f"   ({time.time() - t0:.1f} s with builds)", file=sys.stderr, flush=True)
            if args.json:  # atomically: the stage's time limit may stop the script at any point
                write_file_atomically(args.json, (json.dumps({"spec": args.spec, "gpu": gpu_name, "rows": rows},
                                                             indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
