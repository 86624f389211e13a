"""Per-call overhead of ``op(...)`` above the backend's own call, on tiny CPU tensors.

A probe backend whose forward only copies x (registered with
``gspngen.backends.register_backend``) isolates what the op adds: input
validation, backend resolution and dispatch. Three timings, median of
--repeats batches of --calls calls each (microseconds per call):

- backend: ``probe.forward(spec, x, w, lam, u, s, m)`` alone;
- op(backend="probe"): a fixed backend;
- op(backend="auto"), cache hit: the probe is the cached winner (put there
  through replay, without timing anything), GSPNGEN_CACHE_DIR a temp folder;
- and, with inputs that require grad, the autograd path (informational).

Usage: python benchmarks/op_overhead.py [--calls 2000] [--repeats 7] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    os.environ["GSPNGEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="gspngen-overhead-")
    os.environ.pop("GSPNGEN_AUTOTUNE", None)

    import torch

    import gspngen
    from gspngen.backends import register_backend
    from gspngen.backends.reference import ReferenceBackend
    from gspngen.testing import make_inputs

    torch.set_num_threads(1)

    class Probe(ReferenceBackend):
        name = "probe"

        def forward(self, spec, x, w, lam, u, s, m):
            return x.clone(), x.new_empty(0)

    register_backend("probe", Probe)
    spec = gspngen.load_spec(os.path.join(os.path.dirname(__file__), "..", "examples", "gspn4.yaml"))
    inp = make_inputs(spec, 1, 1, 2, 2, dtype=torch.float32)
    a = [inp[k] for k in ("x", "w", "lam", "u", "s", "m")]
    probe = Probe()

    # the probe as the cached winner of 'auto' for this shape, through replay (nothing is timed)
    from gspngen.tune.replay import replay

    replay({"spec": spec.to_dict(), "device": "cpu", "runs": [
        {"shape": [1, 1, 2, 2], "dtype": "fp32", "pass": "fwd",
         "candidates": {"probe": {"median_ms": 0.001}, "reference": {"median_ms": 1.0}}}]})

    def per_call_us(fn) -> float:
        for _ in range(200):
            fn()
        batches = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            batches.append((time.perf_counter() - t0) / args.calls * 1e6)
        return statistics.median(batches)

    op_fixed = gspngen.compile(spec, backend="probe")
    op_auto = gspngen.compile(spec, backend="auto")
    assert op_auto.resolve_backend(a[0]) == "probe", op_auto.resolve_backend(a[0])
    g = [t.clone().requires_grad_(True) if t is not None else None for t in a]
    results = {
        "backend_us": per_call_us(lambda: probe.forward(spec, *a)),
        "op_fixed_us": per_call_us(lambda: op_fixed(*a)),
        "op_auto_cache_hit_us": per_call_us(lambda: op_auto(*a)),
        "op_auto_requires_grad_us": per_call_us(lambda: op_auto(*g)),
    }
    results["overhead_fixed_us"] = results["op_fixed_us"] - results["backend_us"]
    results["overhead_auto_us"] = results["op_auto_cache_hit_us"] - results["backend_us"]
    results.update(torch=torch.__version__, python=sys.version.split()[0], calls=args.calls, repeats=args.repeats)
    for k, v in results.items():
        print(f"{k:28s} {v:.2f}" if isinstance(v, float) else f"{k:28s} {v}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
