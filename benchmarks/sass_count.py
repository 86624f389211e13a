"""SASS instructions of the fused CUDA kernels a spec launches at a shape (no GPU needed).

Compiles the rendered source with nvcc for sm_90 (the kernels the default tunings
instantiate at the shape) and counts each kernel's instructions with cuobjdump
(nvcc's, else the copy in the Triton wheel):

    python benchmarks/sass_count.py examples/gspn4.yaml --dtype fp32 --shape 16,8,1024,1024
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from gspngen.backends.cuda import CudaBackend
from gspngen.render import cuda as rc
from gspngen.spec import load_spec

H100 = (132, 227 * 1024)  # SM count, opt-in shared memory per block: what plans the launches
FAMILY = re.compile(r"gspn_(\w+?)<")


def _tool(name: str) -> str:
    found = shutil.which(name) or (f"/usr/local/cuda/bin/{name}" if Path(f"/usr/local/cuda/bin/{name}").exists()
                                   else None)
    if found is None and name == "cuobjdump":
        import triton

        found = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    if found is None or not Path(found).exists():
        raise SystemExit(f"{name} not found")
    return found


def count(spec_path: str, dtype: str, shape: tuple[int, int, int, int]) -> dict[str, int]:
    spec = load_spec(spec_path)
    names = CudaBackend(runner=object()).kernel_names(spec, dtype, shape, H100)
    params = {fam: ", ".join(f"{rc.C_TYPES[k]} {n}" for k, n in p) for fam, p in rc.PARAMS.items()}
    inst = [f"template __global__ void {n}({params[FAMILY.match(n).group(1)]});" for n in names]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "gspn.cu"
        src.write_text(rc.render_source(spec, dtype) + "\n" + "\n".join(inst) + "\n")
        subprocess.run([_tool("nvcc"), "-cubin", "-arch=sm_90", "-std=c++17", "-ftz=true", "-o",
                        f"{tmp}/gspn.cubin", str(src)], check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f"{tmp}/gspn.cubin"], capture_output=True, text=True,
                              check=True).stdout
    out = {}
    for func in re.split(r"\n\s+Function : ", sass)[1:]:
        out[func.split("\n", 1)[0]] = len(re.findall(r"/\*[0-9a-f]{4}\*/\s+[A-Z@]", func))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--shape", default="16,8,1024,1024", help="N,C,H,W (default: the paper benchmark's)")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    for name, n in sorted(count(args.spec, args.dtype, shape).items()):
        kind = "fwd" if name.startswith("_Z8gspn_fwd") else "bwd"
        print(f"{kind}  {n:6d} SASS instructions  {name}")


if __name__ == "__main__":
    main()
