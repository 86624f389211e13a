"""A smoke test of benchmarks/attention_latency.py at tiny sizes: every case runs or is marked skipped,
the table, the JSON and the plot come out."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load():
    spec = importlib.util.spec_from_file_location("attention_latency", ROOT / "benchmarks" / "attention_latency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run(tmp_path, capsys):
    bench = load()
    report = bench.main(["--sizes", "4,8", "--channels", "8", "--heads", "1,2", "--budget", "30",
                         "--backend", "reference", "--memory", "inline", "--json", str(tmp_path / "a.json"),
                         "--out", str(tmp_path / "a.png")])
    rows = report["rows"]
    assert [(r["side"], r["op"]) for r in rows] == [(4, "GSPN"), (4, "attention 1h"), (4, "attention 2h"),
                                                     (8, "GSPN"), (8, "attention 1h"), (8, "attention 2h")]
    for r in rows:
        for pass_ in ("fwd", "fwd_bwd"):
            assert r[pass_]["ms"] > 0 and (r[pass_]["peak_bytes"] is None or r[pass_]["peak_bytes"] >= 0)
    out = capsys.readouterr().out
    assert "| tokens | op | fwd ms |" in out and "| 8² = 64 | attention 2h |" in out
    assert json.loads((tmp_path / "a.json").read_text())["rows"][0]["op"] == "GSPN"
    assert (tmp_path / "a.png").stat().st_size > 0


def test_budget_skips_and_crossing():
    bench = load()
    # extrapolation: attention is quadratic by default, GSPN linear
    assert bench.predict([(64, 10.0)], 256, 2.0) == 160.0
    assert bench.predict([], 256, 2.0) == 0.0
    report = {"rows": [
        {"side": 8, "tokens": 64, "op": "GSPN", "fwd": {"ms": 5.0}, "fwd_bwd": {"ms": 9.0}},
        {"side": 8, "tokens": 64, "op": "attention 1h", "fwd": {"ms": 1.0}, "fwd_bwd": {"ms": 2.0}},
        {"side": 16, "tokens": 256, "op": "GSPN", "fwd": {"ms": 20.0}, "fwd_bwd": {"ms": 40.0}},
        {"side": 16, "tokens": 256, "op": "attention 1h", "fwd": {"ms": 30.0}, "fwd_bwd": {"skipped": "x"}},
    ]}
    assert bench.crossings(report) == ["- attention 1h, forward: GSPN faster from 16² tokens",
                                       "- attention 1h, forward+backward: GSPN faster from 16² tokens"]
    assert "skipped" in bench.format_row(report["rows"][3])


def test_memory_in_a_fresh_process():
    bench = load()
    args = bench.parse_args(["--channels", "8", "--backend", "reference"])
    mem = bench.memory_in_subprocess(args, "attention", 32, 1, "fwd_bwd")
    # q, k, v gradients and the output alone are 4 * 1024 * 8 * 4 bytes
    assert mem is None or mem >= 4 * 1024 * 8 * 4
