"""How much `import gspngen` and the CLI add to `import torch` (issue: within 0.3 s).

Runs each command REPEAT times in fresh interpreters, interleaved so machine
noise hits all alike, and prints the medians and the differences:

    python benchmarks/import_time.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

CASES = {
    "import torch": [sys.executable, "-c", "import torch"],
    "import gspngen": [sys.executable, "-c", "import gspngen"],
    "gspngen --version": [shutil.which("gspngen") or "gspngen", "--version"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(args.repeat):
        for name, cmd in CASES.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["import torch"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<20} median {med:.3f} s  (+{med - base:.3f} s over import torch, {args.repeat} runs)")


if __name__ == "__main__":
    main()
