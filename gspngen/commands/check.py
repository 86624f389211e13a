"""gspngen check SPEC [--backend ...] [--shape N,C,H,W] [--dtype ...]"""

from __future__ import annotations

from ..cli import CLIError, parse_ints, seed

DTYPE_CHOICES = ("fp32", "fp64", "fp16", "bf16")


def register(sub) -> None:
    p = sub.add_parser(
        "check",
        help="check a spec on this machine: stability, connectivity, every backend vs the reference, gradients",
        description="Run the checks a spec must pass before you trust it here: mass conservation on large "
                    "logits, dense connectivity (4-direction global specs), every available backend against "
                    "the float64 reference (forward and every gradient, NaN-poisoned), and a float64 gradcheck "
                    "of the reference. Prints a pass/fail table; exit status 1 if anything fails.",
    )
    p.add_argument("spec", metavar="SPEC", help="path to a YAML spec (see examples/)")
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="backend(s) to check, comma-separated or repeated (default: every registered backend; "
                        "those not available here are listed as skipped)")
    p.add_argument("--shape", metavar="N,C,H,W", help="input shape (default: 2,C,9,10 with a small C)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32", help="storage dtype (default fp32)")
    p.add_argument("--device", metavar="DEV", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=seed, default=0, help="random seed for the inputs (default 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..backends import BACKEND_NAMES
    from ..check import DTYPES, format_table, run_checks
    from ..spec import load_spec

    spec = load_spec(args.spec)
    backends = None
    if args.backend:
        backends = [b.strip() for item in args.backend for b in item.split(",") if b.strip()]
        for b in backends:
            if b not in BACKEND_NAMES:
                raise CLIError(f"--backend: expected one of {', '.join(BACKEND_NAMES)}, got {b!r}")
    shape = parse_ints(args.shape, "N,C,H,W", "--shape") if args.shape else None
    if shape is not None and shape[1] % spec.groups(shape[1]):
        raise CLIError(f"--shape: weight_groups={spec.weight_groups} must divide C, got C={shape[1]}")
    device = None
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            pass
        if device is None or device.type not in ("cpu", "cuda"):
            raise CLIError(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device: {args.device} requested but torch sees no CUDA device here")
    dtype = DTYPES[args.dtype]

    rows = run_checks(spec, backends=backends, shape=shape, dtype=dtype, device=device, seed=args.seed)
    from ..check import chunk_note, default_shape

    used = shape or default_shape(spec)
    shown = ",".join(map(str, used))
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"gspngen check: spec '{spec.name}' (sha256 {spec.hash[:16]}), shape {shown}, {args.dtype}, device {dev}")
    note = chunk_note(spec, used)
    if note:
        print(note)
    print(format_table(rows))
    failed = [r for r in rows if r.failed]
    ran = [r for r in rows if r.status in ("PASS", "FAIL")]
    if failed:
        names = ", ".join(f"{r.check} [{r.backend}]" for r in failed)
        print(f"FAILED: {len(failed)} of {len(ran)} checks: {names}")
        return 1
    print(f"OK: all {len(ran)} checks passed")
    return 0
