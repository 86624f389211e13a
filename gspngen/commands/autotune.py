"""gspngen autotune SPEC --shape N,C,H,W [...] [--dtype ...] [--pass fwd bwd] [--backend ...] [--budget-s S]
[--json FILE] | gspngen autotune --replay TIMINGS.json"""

from __future__ import annotations

import sys
from pathlib import Path

DTYPE_NAMES = ("fp32", "fp16", "bf16", "fp64")


def register(sub) -> None:
    p = sub.add_parser(
        "autotune",
        help="tune the fastest verified backend and config per shape, stored in the per-device cache",
        description="For each shape, dtype and pass, run every (backend, config) candidate that can run on this "
                    "device, verify its result against the reference (wrong or failing candidates are rejected "
                    "with the reason), time the rest, and store every timing and the winner in this device's "
                    "cache file (see 'gspngen cache path'). Ops with backend='auto' then run the winner. "
                    "With --replay, recorded timings go through the same selection and cache without running "
                    "anything (format: gspngen/tune/replay.py).",
    )
    p.add_argument("spec", metavar="SPEC", nargs="?", default=None,
                   help="path to a YAML spec (see examples/); not needed with --replay")
    p.add_argument("--shape", metavar="N,C,H,W", nargs="+", action="extend", default=[],
                   help="shape(s) to tune, e.g. --shape 1,32,128,128 16,8,1024,1024")
    p.add_argument("--dtype", metavar="DTYPE", nargs="+", action="extend", default=[],
                   help="storage dtype(s): fp32, fp16, bf16, fp64 (default: the spec's first precision)")
    p.add_argument("--pass", dest="passes", metavar="PASS", nargs="+", action="extend", default=[],
                   help="fwd and/or bwd (default: both)")
    p.add_argument("--backend", metavar="NAME", nargs="+", action="extend", default=[],
                   help="only these backends (default: every candidate the spec and this device allow)")
    p.add_argument("--budget-s", metavar="S", default=None,
                   help="timing budget per candidate and pass in seconds (default: 1 on a GPU, 0.25 on CPU)")
    p.add_argument("--max-configs", metavar="K", default=None,
                   help="at most K configs per backend (the default config among them)")
    p.add_argument("--device", metavar="DEV", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the reports as JSON (atomically)")
    p.add_argument("--replay", metavar="TIMINGS", default=None,
                   help="select from recorded timings (JSON) instead of running kernels")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _positive_float(option: str, value):
    from ..cli import CLIError

    if value is None:
        return None
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if not v > 0 or v == float("inf"):
        raise CLIError(f"{option}: expected a number of seconds > 0, got {value!r}")
    return v


def _num(v) -> str:
    from ..bench import _num as number  # the bench table's format

    return "-" if v is None else number(v)


def format_report(report: dict, copy_gbps=None) -> str:
    """One table per pass: candidate, status, ms, GB/s, % of copy, speedup over the default, the winner marked."""
    from ..bench import minimal_bytes
    from ..spec import Spec

    lines = []
    shape = report.get("shape")
    spec = report.get("_spec")
    for key, entry in report["entries"].items():
        parts = entry["key"]
        shape = entry.get("shape") or shape
        pass_ = parts["pass"]
        nbytes = None
        if isinstance(spec, Spec) and shape and parts["dtype"] != "fp64":
            nbytes = minimal_bytes(spec, *shape, parts["dtype"], "forward" if pass_ == "fwd" else "backward")
        default = entry["candidates"].get(entry.get("default") or "")
        default_ms = default.get("median_ms") if default and default.get("status") == "ok" else None
        lines.append(f"{parts['spec_name']} {','.join(map(str, shape))} {parts['dtype']} {pass_}   "
                     f"bucket {parts['bucket']}   winner: {entry.get('winner') or 'none'}"
                     f"   default: {entry.get('default') or '-'}")
        head = ["", "candidate", "status", "ms", "GB/s", "% copy", "x default"]
        rows = [head]
        order = sorted(entry["candidates"].items(),
                       key=lambda kv: (kv[1]["status"] != "ok", kv[1].get("median_ms") or 0, kv[0]))
        for cid, c in order:
            ok = c["status"] == "ok"
            ms = c.get("median_ms") if ok else None
            gbps = nbytes / (ms * 1e-3) / 1e9 if ok and nbytes else None
            rows.append(["*" if cid == entry.get("winner") else "", cid,
                         "ok" if ok else f"rejected: {c.get('reason', '')}", _num(ms), _num(gbps),
                         _num(100 * gbps / copy_gbps) if gbps and copy_gbps else "-",
                         _num(default_ms / ms) if ok and default_ms and ms else "-"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for i, r in enumerate(rows):
            cells = [c.rjust(widths[j]) if j >= 3 else c.ljust(widths[j]) for j, c in enumerate(r)]
            # the status column can be long: keep it last in spirit by not padding past the numbers
            lines.append("  ".join(cells).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("")
    lines.append("* = winner; x default = the default's median / this one's (same pass); "
                 "GB/s = minimal bytes / median time" + ("; % copy of a dst.copy_(src) measured now"
                                                          if copy_gbps else ""))
    return "\n".join(lines)


class _Bar:
    """A rich progress bar over the candidates on stderr (plain lines if rich is missing)."""

    def __init__(self, quiet: bool):
        self.quiet, self.progress, self.task = quiet, None, None

    def __enter__(self):
        if not self.quiet:
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self.progress = Progress(TextColumn("[bold]autotune[/]"), BarColumn(), MofNCompleteColumn(),
                                         TimeElapsedColumn(), TextColumn("{task.description}"),
                                         console=Console(stderr=True), transient=True)
                self.progress.__enter__()
            except ImportError:
                self.progress = None
        return self

    def __call__(self, event: str, info: dict) -> None:
        if self.quiet:
            return
        if self.progress is None:
            if event == "candidate":
                print(f"[autotune] {info['pass']} {info['id']}: {info['status']}", file=sys.stderr, flush=True)
            return
        if event == "start":
            self.task = self.progress.add_task("", total=info["total"])
        elif event == "candidate" and self.task is not None:
            self.progress.update(self.task, advance=1, description=f"{info['pass']} {info['id']}")

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False


def run(args) -> int:
    from ..cli import CLIError, parse_ints

    if args.json is not None:
        parent = Path(args.json).parent
        if not parent.is_dir():
            raise CLIError(f"--json: folder {str(parent)!r} does not exist")
        if Path(args.json).is_dir():
            raise CLIError(f"--json: {args.json!r} is a folder; expected a file name such as tune.json")

    if args.replay is not None:
        if args.shape or args.backend or args.dtype or args.passes:
            raise CLIError("--replay: the shapes, dtypes, passes and candidates come from the timings file; "
                           "drop --shape/--dtype/--pass/--backend")
        from ..tune.replay import replay

        try:
            report = replay(args.replay)
        except ValueError as exc:
            raise CLIError(f"--replay: {exc}") from None
        print(format_report(report))
        print(f"replayed {len(report['entries'])} entries into the cache"
              + ("" if report["stored"] else " (in memory only: the cache folder cannot be written)"))
        _write_json(args.json, [report])
        return 0

    if args.spec is None:
        raise CLIError("SPEC: expected a path to a YAML spec (or --replay TIMINGS.json)")
    if not args.shape:
        raise CLIError("--shape: expected at least one N,C,H,W to tune")
    from ..backends import backend_names
    from ..spec import load_spec

    spec = load_spec(args.spec)
    shapes = [parse_ints(s, "N,C,H,W", "--shape") for s in args.shape]
    for N, C, H, W in shapes:
        G = spec.groups(C)
        if C % G:
            raise CLIError(f"--shape: C={C} must be divisible by the spec's weight_groups={G}, got {N},{C},{H},{W}")
    dtypes = list(dict.fromkeys(args.dtype)) or [spec.precision[0]]
    for d in dtypes:
        if d not in DTYPE_NAMES:
            raise CLIError(f"--dtype: expected one of {', '.join(DTYPE_NAMES)}, got {d!r}")
    passes = list(dict.fromkeys(args.passes)) or ["fwd", "bwd"]
    for p in passes:
        if p not in ("fwd", "bwd"):
            raise CLIError(f"--pass: expected fwd and/or bwd, got {p!r}")
    backends = list(dict.fromkeys(args.backend)) or None
    for b in backends or ():
        if b not in backend_names():
            raise CLIError(f"--backend: expected one of {', '.join(backend_names())}, got {b!r}")
    budget = _positive_float("--budget-s", args.budget_s)
    max_configs = None
    if args.max_configs is not None:
        try:
            max_configs = int(args.max_configs)
        except ValueError:
            max_configs = 0
        if max_configs < 1:
            raise CLIError(f"--max-configs: expected an integer >= 1, got {args.max_configs!r}")
    if args.device is not None and args.device not in ("cuda", "cpu"):
        raise CLIError(f"--device: expected cuda or cpu, got {args.device!r}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device: cuda requested but no CUDA device is available here")

    from ..bench import measure_copy_bandwidth, resolve_device
    from ..tune.tuner import tune

    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    copy_bytes = (1 << 30) if on_gpu else (64 << 20)
    if on_gpu:
        copy_bytes = min(copy_bytes, int(torch.cuda.mem_get_info(device)[0] * 0.4))
    copy = measure_copy_bandwidth(device, copy_bytes, warmup=2, iters=10 if on_gpu else 5)
    reports = []
    status = 0
    for shape in shapes:
        for d in dtypes:
            with _Bar(args.quiet) as bar:
                report = tune(spec, shape, d, passes, device, budget_s=budget, backends=backends,
                              max_per_backend=max_configs, progress=bar)
            report["_spec"] = spec
            print(format_report(report, copy["gbps"]))
            report.pop("_spec")
            report["copy_bandwidth"] = copy
            reports.append(report)
            if any(e.get("winner") is None for e in report["entries"].values()):
                status = 1
    from ..tune.cache import path_for

    where = path_for(reports[0]["device_id"]) if reports else None
    stored = all(r["stored"] for r in reports)
    print(f"stored in {where}" if stored else "kept in memory only: the cache folder cannot be written")
    _write_json(args.json, reports)
    return status


def _write_json(path, reports) -> None:
    if path is None:
        return
    import json

    from ..atomic import write_file_atomically

    write_file_atomically(path, (json.dumps({"reports": reports}, indent=1, allow_nan=False) + "\n").encode())
    print(f"wrote {path}")
