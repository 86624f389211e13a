"""Autotune the paper suite and compare tuned / default / cuda_per_step (scripts/device_check.sh's autotune stage).

For each suite shape and dtype (fp32, bf16) it tunes forward and backward
(``gspngen.tune.tuner.tune``: every candidate verified, then timed), times
``cuda_per_step`` with the same timing code, and rewrites OUT.json after every
(shape, dtype) so a stage that runs out of time keeps what it finished
("complete": false). Shapes run in suite order, fp32 then bf16 per shape.

Usage: python scripts/autotune_suite.py SPEC OUT.json [--budget-s S] [--max-configs K] [--backends B...] [--dry-run]

Each candidate's median is also printed to stderr as it is timed, so a run cut
short keeps its timings in the log even before OUT.json is first written.

--dry-run: on a machine without a GPU, the suite scaled down for the CPU
(``bench.cpu_scaled``), to check this script end to end; cuda_per_step is then
reported as unavailable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("out")
    parser.add_argument("--budget-s", type=float, default=0.3)
    parser.add_argument("--max-configs", type=int, default=4)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--backends", nargs="+", default=None,
                        help="tune only these backends (default: every registered candidate)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from gspngen import bench
    from gspngen.atomic import write_file_atomically
    from gspngen.spec import load_spec
    from gspngen.tune.candidates import Candidate
    from gspngen.tune.timing import _free, _prepare_copies, base_inputs
    from gspngen.tune.tuner import measure, tune

    spec = load_spec(args.spec)
    on_gpu = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    rows, started = [], time.time()
    suite = [(shape if on_gpu else bench.cpu_scaled(spec, shape, 1 << 12), shape) for shape, _ in bench.PAPER_SUITE]
    total = len(suite) * len(args.dtypes)
    done = 0
    for run_shape, suite_shape in suite:
        for dname in args.dtypes:
            row = {"shape": list(run_shape), "suite_shape": list(suite_shape), "dtype": dname}
            t0 = time.time()
            try:
                report = tune(spec, run_shape, dname, ("fwd", "bwd"), device, budget_s=args.budget_s,
                              max_per_backend=args.max_configs, backends=args.backends,
                              progress=lambda e, i: print(f"[autotune] {i}", file=sys.stderr, flush=True)
                              if e == "candidate" else None)
                for p in ("fwd", "bwd"):
                    entry = report["entries"][report["keys"][p]]
                    cands = entry["candidates"]
                    win, dflt = cands.get(entry["winner"] or ""), cands.get(entry["default"] or "")
                    row[p] = {"winner": entry["winner"], "tuned_ms": win and win.get("median_ms"),
                              "default": entry["default"],
                              "default_ms": dflt.get("median_ms") if dflt and dflt["status"] == "ok" else None,
                              "ok": sum(c["status"] == "ok" for c in cands.values()),
                              "rejected": {k: c["reason"] for k, c in cands.items() if c["status"] != "ok"}}
                # the GSPN-1 launch structure, timed by the same code (a baseline: never a tuning candidate)
                per_step = {"fwd": None, "bwd": None, "note": None}
                try:
                    from gspngen.backends import backend_available

                    if not backend_available("cuda_per_step", device):
                        raise RuntimeError("cuda_per_step cannot run here")
                    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dname]
                    copies, gys = _prepare_copies(spec, run_shape, dtype, device, base_inputs(spec, run_shape),
                                                  2, 0)
                    for p in ("fwd", "bwd"):
                        per_step[p] = measure(spec, Candidate("cuda_per_step"), p, copies, gys, device,
                                              args.budget_s)["median_ms"]
                    del copies, gys
                except Exception as exc:  # out of memory at the largest shapes, or no GPU in a dry run
                    per_step["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                finally:
                    _free(device)
                for p in ("fwd", "bwd"):
                    row[p]["per_step_ms"] = per_step[p]
                row["per_step_note"] = per_step["note"]
                row["status"] = "ok"
            except Exception as exc:
                row["status"] = f"error: {type(exc).__name__}: {exc}"[:300]
                _free(device)
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            done += 1
            result = {"spec": args.spec, "device": str(device), "dry_run": not on_gpu, "budget_s": args.budget_s,
                      "max_configs": args.max_configs, "rows": rows, "complete": done == total,
                      "seconds": round(time.time() - started, 1)}
            write_file_atomically(args.out, (json.dumps(result, indent=1, default=str) + "\n").encode())
            print(f"-- {done}/{total}: {run_shape} {dname} {row['status']} ({row['seconds']} s)",
                  file=sys.stderr, flush=True)
    print(format_rows(rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def format_rows(rows) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.3g}"

    def x(a, b):
        return "-" if a is None or b is None or not b else f"{a / b:.2f}"

    out = ["| N,C,H,W | dtype | pass | winner | tuned ms | default ms | per-step ms | x default | x per-step |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for p in ("fwd", "bwd"):
            d = r.get(p)
            if d is None:
                out.append(f"| {','.join(map(str, r['shape']))} | {r['dtype']} | {p} | {r['status']} | | | | | |")
                continue
            out.append(f"| {','.join(map(str, r['shape']))} | {r['dtype']} | {p} | {d['winner']} | "
                       f"{ms(d['tuned_ms'])} | {ms(d['default_ms'])} | {ms(d['per_step_ms'])} | "
                       f"{x(d['default_ms'], d['tuned_ms'])} | {x(d['per_step_ms'], d['tuned_ms'])} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
