"""The static model's pass times beside `gspngen bench`'s measured ones, from bench JSON files.

For every ok ``cuda`` row of the given JSONs (``gspngen bench --json`` or device_check's bench_*.json),
the predicted forward and backward times for the named GPU (gspngen/perfmodel.py) and the ratios
predicted / measured, then the rms log error over all of them: how well the model describes the runs
(the scattered-request rate was fitted this way to benchmarks/results/device_check_2026-12-04_h200_pm).

Usage (repository root, PYTHONPATH=.): python scripts/perfmodel_vs_measured.py SPEC GPU BENCH.json [...]
"""

from __future__ import annotations

import json
import math
import sys


def rows(spec_path: str, gpu: str, paths: list[str]) -> list[dict]:
    from gspngen.perfmodel import static_figures
    from gspngen.spec import load_spec

    spec = load_spec(spec_path)
    out = []
    for path in paths:
        with open(path) as f:
            bench = json.load(f)
        for r in bench["results"]:
            if r["backend"] != "cuda" or r["status"] != "ok":
                continue
            dt = r["dtype"]
            st = static_figures(spec, dt, tuple(r["shape"]), gpu)
            row = {"shape": r["shape"], "dtype": dt}
            for p, key in (("forward", "fwd"), ("backward", "bwd")):
                row[f"{key}_ms"] = r[p]["median_ms"]
                row[f"{key}_predicted_ms"] = st[p]["predicted_ms"]
            out.append(row)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    got = rows(argv[0], argv[1], argv[2:])
    logs = []
    print("| shape | dtype | forward measured / predicted ms | ratio | backward measured / predicted ms | ratio |")
    print("|---|---|---|---|---|---|")
    for r in got:
        rf, rb = r["fwd_predicted_ms"] / r["fwd_ms"], r["bwd_predicted_ms"] / r["bwd_ms"]
        logs += [math.log(rf), math.log(rb)]
        print(f"| {'×'.join(map(str, r['shape']))} | {r['dtype']} | {r['fwd_ms']:.3g} / {r['fwd_predicted_ms']:.3g} | "
              f"{rf:.2f} | {r['bwd_ms']:.3g} / {r['bwd_predicted_ms']:.3g} | {rb:.2f} |")
    if logs:
        rms = math.sqrt(sum(v * v for v in logs) / len(logs))
        print(f"\n{len(logs)} pass times; rms log error x{math.exp(rms):.2f}; ratios "
              f"{math.exp(min(logs)):.2f}-{math.exp(max(logs)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
