#!/usr/bin/env bash
# GPU evidence for the CUDA backend, in one command (no installs, no network):
#   1. the GPU tests (pytest -m gpu),
#   2. compute-sanitizer memcheck on a small case of every kernel (racecheck and
#      synccheck on a smaller one),
#   3. gspngen bench --suite paper in fp32 and bf16,
#   4. every fused launch timed on its own, per direction and tuning, beside the static model
#      (scripts/gpu_probe.py), and the defaults once more without weight normalisation,
#   5. the autotuner over the paper suite, CUDA variants (forward and backward, fp32 and bf16):
#      tuned against the default against cuda_per_step (scripts/autotune_suite.py),
#   6. the GSPN-vs-attention latency table (benchmarks/attention_latency.py),
#      appended to bench.log,
# then a report (report.md + report.json) in $OUT (default ./out).
# Every stage is time-boxed so the script finishes in under 8 minutes (the
# limits sum to 537 s, and the two GPU-test stages run side by side, so at most 447 s of wall time, plus at
# most 30 s for the report: 477 s; a stage that ignores its SIGTERM gets 5 s more before SIGKILL;
# a GPU session has 15 minutes in all, start-up included) and reports what ran, what failed and what ran
# out of time. $OUT receives exactly 8 files (the device tool returns at most
# 8): report.md, report.json, gpu_tests_cuda.log, gpu_tests_triton.log,
# sanitizer.log, bench.log, bench_fp32.json, bench_bf16.json.
#
# Usage: scripts/device_check.sh            (from anywhere; runs in the repository root)
#        OUT=/some/dir PYTHON=python3 scripts/device_check.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
PY="${PYTHON:-python3}"
SPEC="${SPEC:-examples/gspn4.yaml}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
# tests/conftest.py turns Triton's CPU interpreter on unless the variable is
# set: on a GPU the Triton tests must run compiled kernels.
export TRITON_INTERPRET=0
: > "$WORK/stages.tsv"
for f in report.md report.json gpu_tests_cuda.log gpu_tests_triton.log sanitizer.log bench.log \
         bench_fp32.json bench_bf16.json; do
    rm -f "$OUT/$f"
done

# stage NAME SECONDS LOGFILE COMMAND...: run with a time limit, record status and duration.
stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    local start end rc status
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee -a "$WORK/progress.log"
    echo "== $name: $*" >> "$log"
    timeout -k 5 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    end=$(date +%s)
    case $rc in
        0) status=passed ;;
        124|137) status=timed_out ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((end - start))" "$log" >> "$WORK/stages.tsv"
    echo "   $status (rc $rc, $((end - start)) s)" | tee -a "$WORK/progress.log"
}

# -- environment ---------------------------------------------------------------
stage environment 15 "$WORK/environment.log" bash -c "
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    $PY -c 'import sys, torch; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); print(\"gpu\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
    $PY -c 'import cupy; print(\"cupy\", cupy.__version__)' || true
    $PY -c 'import triton; print(\"triton\", triton.__version__)' || true
    (command -v compute-sanitizer && compute-sanitizer --version | tail -1) || echo 'compute-sanitizer: not found'
    $PY -c 'import xdist; print(\"pytest-xdist\", xdist.__version__)' || true
    $PY -c 'import pytest_timeout; print(\"pytest-timeout: yes\")' || true
"

# -- 1. GPU tests --------------------------------------------------------------
# Compiles (NVRTC, Triton) dominate, on the CPU: the CUDA-side and the Triton
# tests run at the same time, each over several pytest workers (one GPU, small
# cases; the two > 2^31-element cases need about 30 GB each). -v records every
# outcome as it happens, so a stage that runs out of time still says what
# passed; a per-test time-out (pytest-timeout, thread method: a hung kernel
# ends its worker, which xdist replaces) keeps one test from eating the stage.
PYTEST_OPTS=(-m gpu -v --tb=short -rfEs -p no:cacheprovider)
"$PY" -c "import xdist" > /dev/null 2>&1 && PYTEST_OPTS+=(-n 6)
"$PY" -c "import pytest_timeout" > /dev/null 2>&1 && PYTEST_OPTS+=(--timeout 120 --timeout-method thread)
stage gpu_tests_cuda 90 "$OUT/gpu_tests_cuda.log" "$PY" -m pytest "${PYTEST_OPTS[@]}" tests \
    --ignore tests/test_triton_backend.py &
stage gpu_tests_triton 90 "$OUT/gpu_tests_triton.log" "$PY" -m pytest "${PYTEST_OPTS[@]}" \
    tests/test_triton_backend.py &
wait

# -- 2. compute-sanitizer ------------------------------------------------------
cat > "$WORK/sanitize_case.py" <<'EOF'
"""A small case of every kernel. cuda: the example specs (lanes, steps both orders, chan mappings;
shared and grouped weights; chunks; every merge but stack, and a stack spec) in their dtypes, and
the per-step kernels; the shape matches tests/test_cuda_gpu.py, so CuPy's kernel cache holds most
builds. small: the first spec in one dtype. triton: the first case of
tests/test_triton_backend.py::test_gpu_matches_reference, so Triton's cache holds its builds."""
import glob
import sys

import torch

from gspngen.spec import Spec, load_spec
from gspngen.testing import make_inputs

mode = sys.argv[1] if len(sys.argv) > 1 else "cuda"
ARGS = ("x", "w", "lam", "u", "s", "m")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run(be, spec, shape, dtype):
    inp = make_inputs(spec, *shape, dtype=dtype, device="cuda")
    args = [inp[k] for k in ARGS]
    y, saved = be.forward(spec, *args)
    be.backward(spec, torch.randn_like(y), *args, saved)


if mode == "triton":
    from gspngen.backends.triton import TritonBackend

    for dtype in (torch.float32, torch.bfloat16):
        run(TritonBackend(), Spec.from_dict({"name": "gpu", "connection": 3}), (2, 8, 64, 64), dtype)
else:
    from gspngen.backends.cuda import CudaBackend, CudaPerStepBackend

    small = mode == "small"
    specs = [load_spec(p) for p in sorted(glob.glob("examples/*.yaml"))]
    specs.append(Spec.from_dict(dict(name="stack", connection=9, directions=["rl", "tb"], normalization="none",
                                     merge="stack", chunk=2, precision=["fp32"])))
    if small:
        specs = specs[:1]
    for spec in specs:
        for dname in (spec.precision[:1] if small else spec.precision):
            backends = [CudaBackend()] + ([CudaPerStepBackend()] if dname == "fp32" and not small else [])
            for be in backends:
                run(be, spec, (2, 8, 33, 200), DTYPES[dname])
torch.cuda.synchronize()
print("ok", mode)
EOF
# sanitize NAME LIMIT TOOL MODE: one compute-sanitizer stage; its log is appended to sanitizer.log at once.
# PyTorch's caching allocator would hide an overrun inside its pooled blocks: every tensor gets its own
# allocation. API errors are left to the Python side (a failed launch raises there).
sanitize() {
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage "$1" "$2" "$WORK/$1.log" compute-sanitizer --tool "$3" \
        --error-exitcode 1 --print-limit 20 --report-api-errors no "$PY" "$WORK/sanitize_case.py" "$4"
    cat "$WORK/$1.log" >> "$OUT/sanitizer.log"
}
if command -v compute-sanitizer > /dev/null 2>&1; then
    # 2026-12-04 H200 runs: 13, 8-10, 8-9 and 6-8 s
    sanitize memcheck 25 memcheck cuda
    sanitize memcheck_triton 15 memcheck triton
    sanitize racecheck 12 racecheck small
    sanitize synccheck 10 synccheck small
else
    printf 'memcheck\tnot_available\t-\t0\t-\n' >> "$WORK/stages.tsv"
    echo "compute-sanitizer: not found" > "$OUT/sanitizer.log"
fi

# -- 3. benchmarks -------------------------------------------------------------
# The paper suite, one shape at a time in one process (the same run_bench as
# gspngen bench --suite paper): the JSON is rewritten after every shape, so a
# stage that runs out of time keeps the shapes it finished ("complete": false).
cat > "$WORK/bench_suite.py" <<'EOF'
import sys

from gspngen import bench
from gspngen.spec import load_spec

spec_path, dtype, json_path = sys.argv[1:4]
spec = load_spec(spec_path)
suite = bench.SUITES["paper"]
merged = None
for i, entry in enumerate(suite):
    bench.SUITES[f"paper_{i}"] = (entry,)
    rep = bench.run_bench(spec, bench.BenchConfig(suite=f"paper_{i}", dtypes=[dtype]),
                          log=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    if merged is None:
        merged = rep
        merged["copy_bandwidth_per_shape"] = []
    else:
        merged["results"] += rep["results"]
        merged["notes"] += [n for n in rep["notes"] if n not in merged["notes"]]
    merged["copy_bandwidth_per_shape"].append(rep["copy_bandwidth"])
    merged["config"]["suite"] = "paper"
    merged["complete"] = i == len(suite) - 1
    merged["device_check_note"] = ("one suite shape per run_bench call; each row's fraction_of_copy uses the "
                                   "copy bandwidth measured for its shape (copy_bandwidth_per_shape)")
    bench.write_json(merged, json_path)
    print(bench.format_table(rep), flush=True)
    print(f"-- {dtype}: {i + 1}/{len(suite)} shapes written to {json_path}", file=sys.stderr, flush=True)
print(bench.format_table(merged))
sys.exit(1 if any(r["status"] == "error" for r in merged["results"]) else 0)
EOF
for dt in fp32 bf16; do
    # fp32 runs first and pays the first-use kernel builds (the 2026-12-04 H200 run stopped at 50 s)
    stage "bench_$dt" "$([ "$dt" = fp32 ] && echo 75 || echo 45)" "$WORK/bench_$dt.log" "$PY" "$WORK/bench_suite.py" "$SPEC" "$dt" "$OUT/bench_$dt.json"
    cat "$WORK/bench_$dt.log" >> "$OUT/bench.log"
done

# -- 4. per-launch probe --------------------------------------------------------
# Each fused launch timed on its own (CUDA events around the backend's launches) for the default tunings at
# three shapes in fp32 and bf16, then every tuning of each shape in fp32: which direction and tuning hold
# the time (scripts/gpu_probe.py says why). --no-static: the model's per-launch figures would build every
# kernel a second time (ptxas, cuobjdump), and bench.log already has them for the defaults.
stage probe 90 "$WORK/probe.log" "$PY" scripts/gpu_probe.py "$SPEC" --shapes 16,8,1024,1024 1,16,128,128 \
    1,128,512,512 --dtypes fp32 bf16 --reps 5 --no-static --json "$WORK/probe.json"
cat "$WORK/probe.log" >> "$OUT/bench.log"
# The same spec without weight normalisation (no exponentials or reciprocals in a step), defaults only: if
# the per-step time falls with them, the normalisation's latency chain is what a step waits on.
sed 's/^normalization: .*/normalization: none/; s/^name: .*/name: probe_none/' "$SPEC" > "$WORK/probe_none.yaml"
stage probe_none 30 "$WORK/probe_none.log" "$PY" scripts/gpu_probe.py "$WORK/probe_none.yaml" --shapes \
    16,8,1024,1024 1,32,128,128 --dtypes fp32 --variants default --reps 5 --no-static --json "$WORK/probe_none.json"
cat "$WORK/probe_none.log" >> "$OUT/bench.log"

# -- 5. autotune ----------------------------------------------------------------
# Shapes in suite order, fp32 then bf16 each; autotune.json is rewritten after every (shape, dtype), so a
# stage that runs out of time keeps what it finished. The tuning cache goes to the work folder (thrown
# away); the log joins bench.log and the table joins report.md, keeping $OUT at 8 files. CUDA variants only:
# with Triton's configurations the first (shape, dtype) took 60 s at 4 configs per backend and did not finish
# in 150 s at 8 (2026-12-04 H200 runs; Triton compiles), and the bench stage already times Triton's default.
GSPNGEN_CACHE_DIR="$WORK/cache" stage autotune 20 "$WORK/autotune.log" "$PY" scripts/autotune_suite.py "$SPEC" \
    "$WORK/autotune.json" --budget-s 0.3 --max-configs 4 --backends cuda
cat "$WORK/autotune.log" >> "$OUT/bench.log"

# -- 6. GSPN vs attention ------------------------------------------------------
# Latency and peak memory from 32² to 512² tokens (C = 64, 1 and 4 heads); a case
# predicted past 5 s per call is skipped; the table is printed size by size, so a stage cut short (the
# 2026-12-04 runs reached 256^2 in 25 s; 512^2 was measured in a separate call) keeps what it did. The table
# goes to bench.log (the device tool returns 8 files at most).
stage attention 20 "$WORK/attention.log" "$PY" benchmarks/attention_latency.py --device cuda \
    --sizes 32,64,128,256,512 --channels 64 --heads 1,4 --budget 5 --max-gb 60 --json "$WORK/attention.json"
cat "$WORK/attention.log" >> "$OUT/bench.log"

# -- report --------------------------------------------------------------------
timeout 30 "$PY" - "$WORK" "$OUT" "$SPEC" <<'EOF'
import json, os, sys, time
work, out, spec = sys.argv[1:4]

def shown(name, log):
    """The $OUT file that holds a stage's log (sanitizer and bench stages append theirs to one file)."""
    if log == "-" or name == "environment":
        return None
    if name.startswith(("bench_", "probe")) or name in ("autotune", "attention"):
        return "bench.log"
    if name.startswith(("memcheck", "racecheck", "synccheck")):
        return "sanitizer.log"
    return os.path.basename(log)

def tail(path, n=40):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""

stages = []
with open(os.path.join(work, "stages.tsv")) as f:
    for line in f:
        name, status, rc, seconds, log = line.rstrip("\n").split("\t")
        stages.append({"stage": name, "status": status, "rc": rc, "seconds": int(seconds),
                       "log": shown(name, log), "tail": tail(log) if log != "-" else ""})
bench = {}
for dt in ("fp32", "bf16"):
    p = os.path.join(out, f"bench_{dt}.json")
    if os.path.exists(p):
        try:
            bench[dt] = json.load(open(p))
        except ValueError:
            bench[dt] = None
report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "spec": spec,
          "environment": tail(os.path.join(work, "environment.log"), 20), "stages": stages,
          "bench_files": sorted(f"bench_{dt}.json" for dt in bench),
          "bench_complete": {dt: bool(b and b.get("complete")) for dt, b in bench.items()}}
with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
lines = ["# gspngen CUDA device check", "", f"{report['date']}; spec {spec}", "", "## Environment", "", "```",
         report["environment"].rstrip(), "```", "", "## Stages", "", "| stage | status | seconds | log |",
         "|---|---|---|---|"]
lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['log'] or '-'} |" for s in stages]
for s in stages:
    if s["stage"] == "environment":
        continue
    lines += ["", f"### {s['stage']} ({s['status']})", "", "```", s["tail"].rstrip()[-6000:], "```"]
def cell(r, p, k, scale=1.0):
    v = (r.get(p) or {}).get(k)
    return "-" if v is None else f"{v * scale:.3g}"

for dt, b in bench.items():
    if not b:
        continue
    lines += ["", f"## Benchmark {dt} ({'complete' if b.get('complete') else 'INCOMPLETE: stage ran out of time'})",
              "", "| N,C,H,W | backend | status | fwd ms | fwd %copy | bwd ms | bwd %copy |", "|---|---|---|---|---|---|---|"]
    for r in b["results"]:
        lines.append(f"| {','.join(map(str, r['shape']))} | {r['backend']} | {r['status']} | "
                     f"{cell(r, 'forward', 'median_ms')} | {cell(r, 'forward', 'fraction_of_copy', 100)} | "
                     f"{cell(r, 'backward', 'median_ms')} | {cell(r, 'backward', 'fraction_of_copy', 100)} |")
report["probe"] = {}
for pname in ("probe", "probe_none"):
    try:
        pj = json.load(open(os.path.join(work, f"{pname}.json")))
    except (OSError, ValueError):
        continue
    probe = pj.get("rows", [])
    report["probe"][pname] = pj
    if not probe:
        continue
    lines += ["", f"## Per-launch probe, {pname} (scripts/gpu_probe.py {pj.get('spec')}; median of 5 calls, CUDA events "
              "around each launch)", "",
              "| N,C,H,W | dtype | pass | tuning | dir | threads | vec | nseg | P | bufs | stage | ms | us/step | predicted ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in probe:
        pm = r.get("predicted_ms")
        lines.append(f"| {','.join(map(str, r['shape']))} | {r['dtype']} | {r['pass']} | {r['variant']} | "
                     f"{r['direction']} | {r['threads']} | {r['vec']} | {r['nseg']} | {r['prefetch']} | {r['bufs']} | "
                     f"{r['stage']} | {r['ms']:.3f} | {r['us_per_step']:.2f} | {'-' if pm is None else f'{pm:.3f}'} |")
tuned = None
try:
    tuned = json.load(open(os.path.join(work, "autotune.json")))
except (OSError, ValueError):
    pass
report["autotune"] = tuned
with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
if tuned:
    sys.path.insert(0, "scripts")
    from autotune_suite import format_rows

    lines += ["", f"## Autotune ({'complete' if tuned.get('complete') else 'INCOMPLETE: stage ran out of time'}; "
              f"budget {tuned['budget_s']} s per candidate, at most {tuned['max_configs']} configs per backend)", "",
              "x default / x per-step: the default's / cuda_per_step's median over the tuned winner's (same pass).",
              "", format_rows(tuned["rows"])]
lines += ["", "Benchmark tables and notes: bench.log; machine-readable: bench_*.json; autotune rows: report.json."]
with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(f"{s['stage']}: {s['status']} ({s['seconds']} s)" for s in stages))
EOF
rm -rf "$WORK"
