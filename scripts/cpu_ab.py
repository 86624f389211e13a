"""A/B of CPU kernel sources in one process: the way kernel changes were timed (README, issue 10).

The machines this project runs on are shared and noisy: two `gspngen bench` runs minutes apart differ
by 20 % or more. Timing the variants alternately in one process, many rounds, and comparing their
minimum (and median) per-call times is what separates a 3 % change from the noise.

    python scripts/cpu_ab.py --emit /tmp/new.cpp              # the current template's source for a spec
    git stash; python scripts/cpu_ab.py --emit /tmp/old.cpp; git stash pop
    python scripts/cpu_ab.py /tmp/old.cpp /tmp/new.cpp        # forward and backward, min / median ms

Every source runs on the same inputs; the first source's outputs are the baseline the others'
largest differences are printed against (0 where a change must not alter a bit).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", nargs="*", help="kernel sources (.cpp) to time against each other")
    ap.add_argument("--spec", default="examples/gspn4.yaml")
    ap.add_argument("--shape", default="2,32,128,128", help="N,C,H,W (nchw) as gspngen bench takes it")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp64", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--rounds", type=int, default=8, help="rounds; each times every source in turn")
    ap.add_argument("--calls", type=int, default=6, help="calls per source and round (backward: half)")
    ap.add_argument("--emit", metavar="FILE", help="write the current template's source for --spec, and stop")
    args = ap.parse_args(argv)

    import torch

    import gspngen
    from gspngen.backends.cpu import CpuBackend
    from gspngen.render import cpu as rc
    from gspngen.testing import ARG_NAMES, make_inputs

    spec = gspngen.load_spec(args.spec)
    if args.emit:
        with open(args.emit, "w") as f:
            f.write(rc.kernel_source(spec))
        return 0
    if len(args.sources) < 1:
        ap.error("sources: give at least one .cpp (see --emit)")
    try:
        shape = tuple(int(v) for v in args.shape.split(","))
        assert len(shape) == 4
    except (ValueError, AssertionError):
        ap.error(f"--shape: expected N,C,H,W, got {args.shape!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    texts = []
    for path in args.sources:
        with open(path) as f:
            texts.append(f.read())
    inputs = make_inputs(spec, *shape, dtype=dtype, seed=0)
    call_args = [inputs[n] for n in ARG_NAMES]
    original = rc.kernel_source
    current = {"text": texts[0]}
    rc.kernel_source = lambda _spec: current["text"]  # every backend call below builds / loads this text
    try:
        be = CpuBackend()
        y, saved = be.forward(spec, *call_args)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        outs = []
        for text in texts:  # build each once, outside the timing, and keep its outputs
            current["text"] = text
            y, saved = be.forward(spec, *call_args)
            outs.append((y, be.backward(spec, gy, *call_args, saved)[0]))
        for path, (y, gx) in zip(args.sources[1:], outs[1:]):
            dy = (y.double() - outs[0][0].double()).abs().max().item()
            dg = (gx.double() - outs[0][1].double()).abs().max().item()
            print(f"{path}: largest difference from {args.sources[0]}: y {dy:.3g}, gx {dg:.3g}")
        times = {(i, p): [] for i in range(len(texts)) for p in ("fwd", "bwd")}
        for _ in range(args.rounds):
            for i, text in enumerate(texts):
                current["text"] = text
                for p, n in (("fwd", args.calls), ("bwd", max(1, args.calls // 2))):
                    t = time.perf_counter()
                    for _ in range(n):
                        if p == "fwd":
                            be.forward(spec, *call_args, need_saved=False)
                        else:
                            be.backward(spec, gy, *call_args, saved)
                    times[(i, p)].append((time.perf_counter() - t) / n * 1e3)
    finally:
        rc.kernel_source = original
    print(f"{spec.name} {args.shape} {args.dtype}, {torch.get_num_threads()} threads, {args.rounds} rounds "
          f"(ms per call: min / median)")
    for i, path in enumerate(args.sources):
        f, b = times[(i, "fwd")], times[(i, "bwd")]
        print(f"  {path}: forward {min(f):.2f} / {statistics.median(f):.2f}   "
              f"backward {min(b):.2f} / {statistics.median(b):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
