"""gspngen bench SPEC [--shape N,C,H,W ...] [--suite paper] [--dtype ...] [--backend ...] [--json FILE]"""

from __future__ import annotations

from pathlib import Path

DTYPE_NAMES = ("fp32", "fp16", "bf16")


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time forward and backward per backend against the memory-bandwidth limit",
        description="Time the forward and backward ops of SPEC for each shape, dtype and backend (median of "
                    "timed runs after warm-up, inputs rotated over copies larger than the L2 cache), count the "
                    "minimal bytes each pass must move, and report the effective bandwidth, its fraction of a "
                    "large device-to-device copy measured in the same run, and the speedup over the reference "
                    "and cuda_per_step (GSPN-1's launch structure) backends. Without a GPU the reference backend "
                    "runs on CPU, and the cuda backend, which cannot run there, is described by the static "
                    "performance model (predicted for --gpu, not measured). With neither --shape nor --suite, "
                    "the paper suite runs.",
    )
    p.add_argument("spec", metavar="SPEC", help="path to a YAML spec (see examples/)")
    p.add_argument("--shape", metavar="N,C,H,W", nargs="+", action="extend", default=[],
                   help="shape(s) to run, e.g. --shape 1,32,128,128 16,8,1024,1024")
    p.add_argument("--suite", metavar="NAME", default=None,
                   help="named shape set: paper (GSPN-2's benchmark and bandwidth table, an ImageNet stage, "
                        "2048x2048); without a GPU it is scaled down to run in seconds")
    p.add_argument("--dtype", metavar="DTYPE", nargs="+", action="extend", default=[],
                   help="storage dtype(s): fp32, fp16, bf16 (default: the spec's precision list)")
    p.add_argument("--backend", metavar="NAME", nargs="+", action="extend", default=[],
                   help="backend(s) to time (default on a GPU: cuda triton cuda_per_step reference; "
                        "on CPU: reference); one not available here is skipped with a note")
    p.add_argument("--device", metavar="DEV", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the report as JSON (atomically)")
    p.add_argument("--warmup", metavar="W", default=None, help="untimed calls first (default: 5 on GPU, 1 on CPU)")
    p.add_argument("--iters", metavar="I", default=None,
                   help="timed calls (default and minimum on a GPU: 20; default on CPU: 3)")
    p.add_argument("--copy-mib", metavar="MIB", default=None,
                   help="size of the bandwidth-reference copy (default: 1024 on GPU, 64 on CPU)")
    p.add_argument("--reference-max-elements", metavar="E", default=None,
                   help="on a GPU, skip the (slow) reference backend when N*C*H*W exceeds E (default 8388608)")
    p.add_argument("--gpu", metavar="NAME", default="h100",
                   help="GPU the static performance model predicts for: a100, h100 or h200 (default h100). "
                        "The cuda backend's rows carry its figures (bytes moved, registers, occupancy, SASS "
                        "instructions per element, a predicted time); where cuda cannot run, they replace the "
                        "timings, which are marked not measured")
    p.add_argument("--no-static", action="store_true", help="leave the static performance model out")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def _int_option(option: str, value, minimum: int):
    from ..cli import CLIError

    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise CLIError(f"{option}: expected an integer >= {minimum}, got {value!r}") from None
    if n < minimum:
        raise CLIError(f"{option}: expected an integer >= {minimum}, got {value!r}")
    return n


def run(args) -> int:
    import sys

    from ..backends import BACKEND_NAMES
    from ..bench import SUITES, BenchConfig, format_table, run_bench, write_json
    from ..cli import CLIError, parse_ints
    from ..spec import load_spec

    spec = load_spec(args.spec)
    shapes = [parse_ints(s, "N,C,H,W", "--shape") for s in args.shape]
    for N, C, H, W in shapes:
        G = spec.groups(C)
        if C % G:
            raise CLIError(f"--shape: C={C} must be divisible by the spec's weight_groups={G}, "
                           f"got {N},{C},{H},{W}")
    if args.suite is not None and args.suite not in SUITES:
        raise CLIError(f"--suite: expected one of {', '.join(SUITES)}, got {args.suite!r}")
    dtypes = list(dict.fromkeys(args.dtype)) or list(spec.precision)
    for d in dtypes:
        if d not in DTYPE_NAMES:
            raise CLIError(f"--dtype: expected one of {', '.join(DTYPE_NAMES)}, got {d!r}")
    backends = list(dict.fromkeys(args.backend)) or None
    for b in backends or ():
        if b not in BACKEND_NAMES:
            raise CLIError(f"--backend: expected one of {', '.join(BACKEND_NAMES)}, got {b!r}")
    if args.device is not None and args.device not in ("cuda", "cpu"):
        raise CLIError(f"--device: expected cuda or cpu, got {args.device!r}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CLIError("--device: cuda requested but no CUDA device is available here")
    if args.json is not None:
        parent = Path(args.json).parent
        if not parent.is_dir():
            raise CLIError(f"--json: folder {str(parent)!r} does not exist")
        if Path(args.json).is_dir():
            raise CLIError(f"--json: {args.json!r} is a folder; expected a file name such as bench.json")
    from ..perfmodel import GPUS

    if args.gpu not in GPUS:
        raise CLIError(f"--gpu: expected one of {', '.join(GPUS)}, got {args.gpu!r}")
    copy_mib = _int_option("--copy-mib", args.copy_mib, 1)
    config = BenchConfig(
        shapes=shapes,
        suite=args.suite if (args.suite or shapes) else "paper",
        dtypes=dtypes,
        backends=backends,
        device=args.device,
        warmup=_int_option("--warmup", args.warmup, 1),
        iters=_int_option("--iters", args.iters, 1),
        copy_bytes=None if copy_mib is None else copy_mib << 20,
        gpu=args.gpu,
        static=not args.no_static,
    )
    ref_max = _int_option("--reference-max-elements", args.reference_max_elements, 0)
    if ref_max is not None:
        config.reference_max_elements = ref_max

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

    report = run_bench(spec, config, log=log)
    print(format_table(report))
    if args.json is not None:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    errors = [r for r in report["results"] if r["status"] == "error"]
    return 1 if errors else 0
