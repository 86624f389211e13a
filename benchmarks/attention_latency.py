"""Latency and peak memory of the GSPN mixer against scaled-dot-product attention on the same tokens.

The GSPN paper's operator-latency figure: attention grows quadratically with the number of tokens,
GSPN linearly, so GSPN wins beyond some size. Here, for an image of side s (s^2 tokens, C channels):

- ``GSPN``: the mixer layer ``gspngen.nn.GSPN2d(C, spec)`` (default examples/gspn4.yaml: four
  directions, k = 3) on (N, C, s, s), with its 1x1 projections (proxy to ``d_state`` channels, heads,
  output) included;
- ``attention hH``: ``torch.nn.functional.scaled_dot_product_attention`` on q, k, v of shape
  (N, H, s^2, C/H), the operator alone (no q/k/v/output projections, which favours attention).

Each case is timed forward and forward+backward (median of repeated calls after a warm-up; wall clock
on CPU, CUDA events on a GPU) and its peak memory is measured:

- CPU: in a fresh subprocess per case, started with ``MALLOC_MMAP_THRESHOLD_=16384`` so that every
  allocation of 16 KiB or more is its own mapping, returned to the system when freed (otherwise malloc
  reuses freed heap pages and the resident set does not grow): the resident-set high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the call) minus the resident set
  before it, i.e. what the call added at its peak (inputs excluded; intermediates, outputs, gradients
  and library workspaces included). ``--memory inline`` measures in the timing process instead (cheaper,
  but it under-counts memory that malloc recycles); ``n/a`` where /proc does not allow it;
- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call.

Cases that would run past ``--budget`` seconds per call (extrapolated from the two smaller sizes) or
need more than ``--max-gb`` are skipped and marked. It prints a markdown table for the README and
writes ``--json`` and a log-log plot (``--out``).

    python benchmarks/attention_latency.py --out docs/attention_latency.png --json attention.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gspngen.bench import environment  # noqa: E402
from gspngen.nn import GSPN2d  # noqa: E402

try:  # the timing helpers are moving out of the bench harness; this is the one place that knows
    from gspngen.tune.timing import time_calls  # noqa: E402
except ImportError:
    from gspngen.bench import time_calls  # noqa: E402


# -- peak memory ---------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def peak_bytes(fn, device: torch.device):
    """Memory ``fn()`` adds at its peak (see the module docstring), or None where it cannot be measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not _reset_hwm():
        return None
    before = _status_kb("VmRSS")
    _reset_hwm()
    fn()
    return max(0, _status_kb("VmHWM") - before) * 1024


# -- the cases -----------------------------------------------------------------------------------------


def make_case(op: str, side: int, channels: int, heads: int, batch: int, spec: str, backend: str,
              device: torch.device, d_state):
    """(forward, forward+backward) closures for one case; inputs are built once, outside the timing."""
    g = torch.Generator(device="cpu").manual_seed(0)
    if op == "GSPN":
        layer = GSPN2d(channels, spec, d_state=d_state, backend=backend).to(device)
        x = torch.randn(batch, channels, side, side, generator=g).to(device).requires_grad_()

        def fwd():
            with torch.no_grad():
                return layer(x)

        def fwd_bwd():
            layer(x).sum().backward()
            x.grad = None
            layer.zero_grad(set_to_none=True)

        return fwd, fwd_bwd
    L, hd = side * side, channels // heads
    q, k, v = (torch.randn(batch, heads, L, hd, generator=g).to(device).requires_grad_() for _ in range(3))

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v)

    def fwd_bwd():
        F.scaled_dot_product_attention(q, k, v).sum().backward()
        for t in (q, k, v):
            t.grad = None

    return fwd, fwd_bwd


def memory_in_subprocess(args, op: str, side: int, heads: int, pass_: str):
    """Peak bytes of one CPU case measured in a fresh process (see the module docstring), or None."""
    import subprocess

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, __file__, "--measure-memory", f"{op},{side},{heads},{pass_}", "--channels",
           str(args.channels), "--batch", str(args.batch), "--spec", args.spec, "--backend", args.backend]
    if args.d_state:
        cmd += ["--d-state", str(args.d_state)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(60.0, 10 * args.budget))
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def _measure_memory_main(args) -> None:
    """The subprocess side of memory_in_subprocess: print the peak bytes of one case (-1: unmeasurable)."""
    op, side, heads, pass_ = args.measure_memory.split(",")
    fwd, fwd_bwd = make_case(op, int(side), args.channels, int(heads), args.batch, args.spec, args.backend,
                             torch.device("cpu"), args.d_state)
    fn = fwd if pass_ == "fwd" else fwd_bwd
    fn()  # warm: lazily built state (backend choice, kernels) is not the call's memory
    mem = peak_bytes(fn, torch.device("cpu"))
    print(-1 if mem is None else mem)


def time_ms(fn, device: torch.device, budget: float) -> float:
    t = time_calls(lambda i: fn(), device, warmup=1, iters=5, max_seconds=budget)
    return statistics.median(t.ms)


def predict(history: list[tuple[int, float]], tokens: int, default_exponent: float) -> float:
    """Extrapolate a cost to ``tokens`` from the two largest measured sizes (or a default power law)."""
    if not history:
        return 0.0
    if len(history) >= 2:
        (t0, c0), (t1, c1) = history[-2:]
        exponent = math.log(max(c1, 1e-9) / max(c0, 1e-9)) / math.log(t1 / t0)
        # clamp: on a busy machine two noisy timings can suggest any growth
        exponent = min(max(exponent, default_exponent / 2), default_exponent * 1.5)
    else:
        exponent = default_exponent
    t1, c1 = history[-1]
    return c1 * (tokens / t1) ** exponent


def run(args) -> dict:
    device = torch.device(args.device)
    ops = [("GSPN", 1)] + [("attention", h) for h in args.heads]
    rows = []
    history: dict[tuple[str, int, str], list] = {}
    for side in args.sizes:
        tokens = side * side
        for op, heads in ops:
            name = "GSPN" if op == "GSPN" else f"attention {heads}h"
            row = {"side": side, "tokens": tokens, "op": name, "heads": heads}
            quad = 2.0 if op == "attention" else 1.0
            for pass_ in ("fwd", "fwd_bwd"):
                t_hist = history.setdefault((name, pass_, "ms"), [])
                m_hist = history.setdefault((name, pass_, "bytes"), [])
                est_s = predict(t_hist, tokens, quad) / 1e3
                est_gb = predict(m_hist, tokens, 1.0) / 1e9
                if est_s > args.budget:
                    row[pass_] = {"skipped": f"predicted {est_s:.0f} s > budget {args.budget:.0f} s"}
                    continue
                if est_gb > args.max_gb:
                    row[pass_] = {"skipped": f"predicted {est_gb:.1f} GB > {args.max_gb:.0f} GB"}
                    continue
                try:
                    fwd, fwd_bwd = make_case(op, side, args.channels, heads, args.batch, args.spec, args.backend,
                                             device, args.d_state)
                    fn = fwd if pass_ == "fwd" else fwd_bwd
                    t0 = time.perf_counter()
                    mem = peak_bytes(fn, device)  # also the warm-up call
                    first = time.perf_counter() - t0
                    if device.type == "cpu" and args.memory == "subprocess":
                        mem = memory_in_subprocess(args, op, side, heads, pass_)
                    if first > args.budget:  # one call was enough to know; do not repeat it
                        ms = first * 1e3
                    else:
                        ms = time_ms(fn, device, args.budget)
                    del fwd, fwd_bwd, fn
                except (RuntimeError, MemoryError) as exc:  # out of memory, or an unsupported size
                    row[pass_] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
                    continue
                row[pass_] = {"ms": ms, "peak_bytes": mem}
                t_hist.append((tokens, ms))
                if mem:
                    m_hist.append((tokens, mem))
            rows.append(row)
            print(format_row(row), flush=True)
    return {"env": environment(device), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()}, "rows": rows}


# -- reporting -----------------------------------------------------------------------------------------


def _cell(r: dict, key: str) -> str:
    if "skipped" in r:
        return "skipped"
    v = r.get(key)
    if v is None:
        return "n/a"
    if key == "ms":
        return f"{v:,.1f}" if v >= 10 else f"{v:.2f}"
    return f"{v / 2**20:,.0f}"


def format_row(row: dict) -> str:
    f, b = row["fwd"], row["fwd_bwd"]
    return (f"| {row['side']}² = {row['tokens']:,} | {row['op']} | {_cell(f, 'ms')} | {_cell(b, 'ms')} | "
            f"{_cell(f, 'peak_bytes')} | {_cell(b, 'peak_bytes')} |")


def crossings(report: dict) -> list[str]:
    """Per attention variant and pass: the smallest size from which GSPN is faster."""
    out = []
    rows = report["rows"]
    gspn = {r["side"]: r for r in rows if r["op"] == "GSPN"}
    for name in sorted({r["op"] for r in rows if r["op"] != "GSPN"}):
        for pass_ in ("fwd", "fwd_bwd"):
            win = None
            for r in (r for r in rows if r["op"] == name):
                g, a = gspn[r["side"]][pass_], r[pass_]
                if "ms" in g and ("skipped" in a or a["ms"] > g["ms"]):
                    win = r["side"]
                    break
            label = "forward" if pass_ == "fwd" else "forward+backward"
            out.append(f"- {name}, {label}: GSPN faster from {win}² tokens" if win
                       else f"- {name}, {label}: GSPN not faster at the sizes measured")
    return out


def markdown(report: dict) -> str:
    a, env = report["args"], report["env"]
    head = ("| tokens | op | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB |\n"
            "|---|---|---:|---:|---:|---:|")
    where = env.get("gpu") or f"CPU ({os.cpu_count()} cores)"
    note = (f"\nC = {a['channels']}, batch {a['batch']}, spec {Path(a['spec']).name}, backend {a['backend']!r}, "
            f"{where}, torch {env['torch']}. Skipped: predicted past {a['budget']:g} s per call or "
            f"{a['max_gb']:.0f} GB. Peak memory: "
            + ("torch.cuda.max_memory_allocated above the inputs." if a["device"].startswith("cuda") else
               "resident-set high-water mark above the inputs (VmHWM after /proc/self/clear_refs"
               + (", a fresh process per case, allocations of 16 KiB or more mapped on their own)."
                  if a["memory"] == "subprocess" else ", in the timing process: a lower bound).")))
    return "\n".join([head, *map(format_row, report["rows"])]) + "\n" + note + "\n\n" + "\n".join(crossings(report))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(dict.fromkeys(r["op"] for r in report["rows"]))
    for ax, key, ylabel in ((axes[0], "ms", "milliseconds"), (axes[1], "peak_bytes", "peak MiB")):
        for i, name in enumerate(names):
            for pass_, style in (("fwd", "-"), ("fwd_bwd", "--")):
                pts = [(r["tokens"], r[pass_][key] / (1 if key == "ms" else 2**20)) for r in report["rows"]
                       if r["op"] == name and r[pass_].get(key)]
                if pts:
                    x, y = zip(*pts)
                    ax.plot(x, y, style, marker="o", color=f"C{i}",
                            label=f"{name} {'fwd' if pass_ == 'fwd' else 'fwd+bwd'}")
        ax.set(xscale="log", yscale="log", xlabel="tokens (image side²)", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("latency")
    axes[1].set_title("peak memory")
    axes[0].legend(fontsize=7)
    env = report["env"]
    fig.suptitle(f"GSPN mixer vs scaled_dot_product_attention, C = {report['args']['channels']} "
                 f"({env.get('gpu') or 'CPU'})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=ints, default=[32, 64, 128, 256, 512], help="image sides (tokens = side²)")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--heads", type=ints, default=[1, 4], help="attention head counts")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--spec", default=str(ROOT / "examples" / "gspn4.yaml"))
    p.add_argument("--d-state", type=int, default=None, help="GSPN proxy channels (default min(C, 16))")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per call beyond which a case is skipped")
    p.add_argument("--max-gb", type=float, default=8.0, help="peak GB beyond which a case is skipped")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--memory", choices=["subprocess", "inline"], default="subprocess",
                   help="CPU peak memory: a fresh process per case (accurate) or the timing process")
    p.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help="log-log plot (PNG)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory:
        _measure_memory_main(args)
        return {}
    for h in args.heads:
        if args.channels % h:
            raise SystemExit(f"--heads: {h} does not divide --channels {args.channels}")
    print("| tokens | op | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB |", flush=True)
    report = run(args)
    print("\n" + markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    if args.out:
        plot(report, args.out)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
