"""SASS instructions of the fused CUDA kernels a spec launches at a shape (no GPU needed).

Builds the kernels the cuda backend would launch on the named GPU with the runtime's NVRTC options and
counts each kernel's instructions with cuobjdump, through the static performance model
(gspngen/perfmodel.py, which also gives bytes, registers, occupancy and a prediction: ``gspngen bench
--backend cuda``). Prints the tile loop's instructions, per element, and the kernel's total:

    python benchmarks/sass_count.py examples/gspn4.yaml --dtype fp32 --shape 16,8,1024,1024
"""

from __future__ import annotations

import argparse

from gspngen import perfmodel as pm
from gspngen.render import cuda as rc
from gspngen.spec import load_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--shape", default="16,8,1024,1024", help="N,C,H,W (default: the paper benchmark's)")
    parser.add_argument("--gpu", default=pm.DEFAULT_GPU, choices=sorted(pm.GPUS))
    args = parser.parse_args()
    spec = load_spec(args.spec)
    shape = tuple(int(v) for v in args.shape.split(","))
    gpu = pm.gpu_by_name(args.gpu)
    plans = pm.plan_launches(spec, args.dtype, shape, gpu)
    launches = {l.name: l for ls in plans.values() for l in ls}
    facts = pm.kernel_facts(rc.kernel_source(spec, args.dtype), list(launches), gpu.arch)
    for name, f in facts.items():
        per = f.loop_instructions / launches[name].elements_per_iteration
        print(f"{name[5:8]}  {f.loop_instructions:6d} in the tile loop ({per:6.1f} per element), "
              f"{f.instructions:6d} in all  {name}")


if __name__ == "__main__":
    main()
