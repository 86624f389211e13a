#!/usr/bin/env bash
# GPU evidence for the CUDA backend, in one command (no installs, no network):
#   1. the GPU tests (pytest -m gpu),
#   2. compute-sanitizer memcheck on a small case of every kernel (racecheck and
#      synccheck on a smaller one),
#   3. gspngen bench --suite paper in fp32 and bf16,
# then a report (report.md + report.json) in $OUT (default ./out).
# Every stage is time-boxed so the script finishes in under 8 minutes and
# reports what ran, what failed and what ran out of time.
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
: > "$WORK/stages.tsv"

# stage NAME SECONDS LOGFILE COMMAND...: run with a time limit, record status and duration.
stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    local start end rc status
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee -a "$WORK/progress.log"
    timeout -k 10 "$limit" "$@" > "$log" 2>&1
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
stage environment 20 "$WORK/environment.log" bash -c "
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    $PY -c 'import sys, torch; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); print(\"gpu\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
    $PY -c 'import cupy; print(\"cupy\", cupy.__version__)' || true
    $PY -c 'import triton; print(\"triton\", triton.__version__)' || true
    (command -v compute-sanitizer && compute-sanitizer --version | tail -1) || echo 'compute-sanitizer: not found'
"

# -- 1. GPU tests --------------------------------------------------------------
# NVRTC compiles dominate a first run: several pytest workers compile in parallel (one GPU, small cases).
XDIST=""
"$PY" -c "import xdist" > /dev/null 2>&1 && XDIST="-n 4"
stage gpu_tests 160 "$OUT/gpu_tests.log" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs $XDIST tests

# -- 2. compute-sanitizer ------------------------------------------------------
cat > "$WORK/sanitize_case.py" <<'EOF'
"""A small case of every kernel: the example specs (lanes, steps both orders, chan mappings; shared
and grouped weights; chunks; every merge but stack, and a stack spec) in their dtypes, and the
per-step kernels. The shape matches tests/test_cuda_gpu.py, so CuPy's kernel cache holds most builds."""
import glob
import sys

import torch

from gspngen.backends.cuda import CudaBackend, CudaPerStepBackend
from gspngen.spec import Spec, load_spec
from gspngen.testing import make_inputs

small = len(sys.argv) > 1 and sys.argv[1] == "small"
specs = [load_spec(p) for p in sorted(glob.glob("examples/*.yaml"))]
specs.append(Spec.from_dict(dict(name="stack", connection=9, directions=["rl", "tb"], normalization="none",
                                 merge="stack", chunk=2, precision=["fp32"])))
if small:
    specs = specs[:1]
shape = (2, 8, 33, 200)
for spec in specs:
    for dname in (spec.precision[:1] if small else spec.precision):
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dname]
        inp = make_inputs(spec, *shape, dtype=dtype, device="cuda")
        args = [inp[k] for k in ("x", "w", "lam", "u", "s", "m")]
        backends = [CudaBackend()] + ([CudaPerStepBackend()] if dname == "fp32" and not small else [])
        for be in backends:
            y, saved = be.forward(spec, *args)
            be.backward(spec, torch.randn_like(y), *args, saved)
torch.cuda.synchronize()
print("ok")
EOF
if command -v compute-sanitizer > /dev/null 2>&1; then
    stage memcheck 70 "$OUT/sanitizer.log" compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
        "$PY" "$WORK/sanitize_case.py"
    stage racecheck 25 "$WORK/racecheck.log" compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 \
        "$PY" "$WORK/sanitize_case.py" small
    stage synccheck 20 "$WORK/synccheck.log" compute-sanitizer --tool synccheck --error-exitcode 1 --print-limit 20 \
        "$PY" "$WORK/sanitize_case.py" small
    cat "$WORK/racecheck.log" "$WORK/synccheck.log" >> "$OUT/sanitizer.log" 2>/dev/null
else
    printf 'memcheck\tnot_available\t-\t0\t-\n' >> "$WORK/stages.tsv"
fi

# -- 3. benchmarks -------------------------------------------------------------
for dt in fp32 bf16; do
    stage "bench_$dt" 80 "$OUT/bench_$dt.log" "$PY" -m gspngen bench "$SPEC" --suite paper --dtype "$dt" \
        --json "$OUT/bench_$dt.json"
done

# -- report --------------------------------------------------------------------
"$PY" - "$WORK" "$OUT" "$SPEC" <<'EOF'
import json, os, sys, time
work, out, spec = sys.argv[1:4]

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
                       "log": os.path.basename(log) if log != "-" else None, "tail": tail(log) if log != "-" else ""})
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
          "bench_files": sorted(f"bench_{dt}.json" for dt in bench)}
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
lines += ["", "Benchmark tables: the bench_*.log files; machine-readable: bench_*.json."]
with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(f"{s['stage']}: {s['status']} ({s['seconds']} s)" for s in stages))
EOF
rm -rf "$WORK"
