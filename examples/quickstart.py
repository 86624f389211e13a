"""Quick start: import the package `gspngen compile` wrote and run its op forward and backward.

Run from the repository root, after compiling the paper's layer spec:

    gspngen compile examples/gspn4.yaml -o build/gspn4
    python examples/quickstart.py [PACKAGE_FOLDER]      # default: build/gspn4
"""

import sys
import time
from pathlib import Path

import torch

import gspngen
from gspngen.testing import make_inputs

folder = Path(sys.argv[1] if len(sys.argv) > 1 else "build/gspn4")
if not (folder / "manifest.json").is_file():
    sys.exit(f"{folder} is not a compiled package; run: gspngen compile examples/gspn4.yaml -o {folder}")
# The package checks its files against manifest.json and runs its own kernel sources.
# (A folder on sys.path imports by name too: `import gspn4` with build/ on PYTHONPATH.)
pkg = gspngen.load_package(folder)
spec, op = pkg.spec, pkg.op
print(f"loaded package {folder} (gspngen {pkg.MANIFEST['gspngen_version']}, files: {', '.join(pkg.SOURCES)})")
device = "cuda" if torch.cuda.is_available() else "cpu"
N, C, H, W = 2, 16, 32, 32
inputs = make_inputs(spec, N, C, H, W, dtype=torch.float32, device=device, requires_grad=True)

print(f"spec '{spec.name}' (sha256 {spec.hash[:12]}): k={spec.connection}, directions={list(spec.directions)}, "
      f"normalization={spec.normalization}, merge={spec.merge}, layout={spec.layout}")
print(f"backend chosen for {device} float32: {op.resolve_backend(inputs['x'])}")
for name, t in inputs.items():
    if t is not None:
        print(f"  {name:>3}: {tuple(t.shape)}")

t0 = time.perf_counter()
y = op(**inputs)
t1 = time.perf_counter()
y.square().mean().backward()
t2 = time.perf_counter()
print(f"forward  -> y {tuple(y.shape)}, mean |y| = {y.abs().mean().item():.4f}  ({(t1 - t0) * 1e3:.1f} ms)")
print(f"backward -> grads for {', '.join(k for k, t in inputs.items() if t is not None and t.grad is not None)}  "
      f"({(t2 - t1) * 1e3:.1f} ms)")

# The Stability-Context Condition: with lam = 1, a line of ones at step 0 stays exactly 1 along the scan.
lr_only = gspngen.compile({"name": "lr_only", "directions": ["lr"], "modulation": False, "skip": False,
                           "merge": "sum"})
probe = make_inputs(lr_only.spec, 1, 1, 8, 8, logit_scale=10.0)
x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
x[..., 0] = 1
h = lr_only(x, probe["w"], torch.ones_like(probe["lam"]))
print(f"mass conservation: max |h - 1| over 8 columns = {(h - 1).abs().max().item():.2e}")
