"""The printed CUDA expressions compile (NVRTC, else nvcc) inside a harness kernel, for every
k and normalisation and every output variant; on a GPU they also agree with the torch printer."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

import pytest
import torch

from gspngen.backends.lowered import compile_block
from gspngen.lower import print_block
from gspngen.lower.derive import output_blocks, update_blocks

KS = (1, 3, 5, 7, 9)
NORMS = ("stability", "softmax", "none")
MERGES = ("sum", "mean", "learned", "stack")
# Warnings are errors: printed code must not even leave an unused variable behind.
OPTIONS = ("-std=c++17", "-arch=sm_90", "-I/usr/local/cuda/include", "-Werror", "all-warnings")
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def harness_kernel(name: str, block) -> str:
    """One thread per pixel: read the block inputs from a row of `inp`, write its outputs to `out`."""
    nin, nout = len(block.inputs), len(block.outputs)
    lines = [f'extern "C" __global__ void {name}(const float* __restrict__ inp, float* __restrict__ out, int n) {{',
             "    const int p = blockIdx.x * blockDim.x + threadIdx.x;",
             "    if (p >= n) return;",
             f"    const float* a = inp + (long long)p * {nin};"]
    for j, v in enumerate(block.inputs):
        if v not in block.used_inputs:
            continue  # e.g. the centre's flag: always true, never read
        if v.startswith("e"):
            lines.append(f"    const bool {v} = a[{j}] != 0.0f;")
        else:
            lines.append(f"    const float {v} = a[{j}];")
    lines += ["    " + line for line in print_block(block, "cuda")]
    lines += [f"    out[(long long)p * {nout} + {j}] = {v};" for j, v in enumerate(block.outputs)]
    lines.append("}")
    return "\n".join(lines)


def update_source(norm: str) -> tuple[str, dict]:
    kernels = {}
    for k in KS:
        fwd, adj = update_blocks(k, norm)
        kernels[f"forward_k{k}"] = fwd
        kernels[f"adjoint_k{k}"] = adj
    return "\n\n".join(harness_kernel(n, b) for n, b in kernels.items()) + "\n", kernels


def output_source() -> tuple[str, dict]:
    kernels = {}
    for mod, skip, merge in itertools.product((False, True), (False, True), MERGES):
        out, adj = output_blocks(mod, skip, merge, 3)
        tag = f"{int(mod)}{int(skip)}_{merge}"
        kernels[f"output_{tag}"] = out
        kernels[f"adjoint_output_{tag}"] = adj
    return "\n\n".join(harness_kernel(n, b) for n, b in kernels.items()) + "\n", kernels


def nvrtc_compile(source: str) -> bytes | None:
    """A cubin for sm_90 through CuPy's NVRTC, or None if CuPy/NVRTC is not installed."""
    try:
        from cupy.cuda import compiler
    except ImportError:
        return None
    program = compiler._NVRTCProgram(source, "harness.cu", method="cubin")
    cubin, _ = program.compile(OPTIONS)  # raises CompileException with the log on any error
    return cubin


def nvcc_compile(source: str, tmp_path) -> bytes | None:
    """A cubin for sm_90 through nvcc, or None without nvcc."""
    if NVCC is None:
        return None
    src, cubin = tmp_path / "harness.cu", tmp_path / "harness.cubin"
    src.write_text(source)
    r = subprocess.run([NVCC, "-cubin", *OPTIONS, "-o", str(cubin), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("nvcc error:\n" + r.stderr)
    return cubin.read_bytes()


def compile_cuda(source: str, tmp_path) -> bytes:
    """NVRTC if available, else nvcc; with neither, a failure in CI and a skip elsewhere."""
    cubin = nvrtc_compile(source)
    if cubin is None:
        cubin = nvcc_compile(source, tmp_path)
    if cubin is None:
        if os.environ.get("CI"):
            pytest.fail("no CUDA compiler: install cupy-cuda13x + nvidia-cuda-nvrtc, or put nvcc on PATH")
        pytest.skip("no CUDA compiler (NVRTC via cupy, or nvcc) on this machine")
    return cubin


@pytest.mark.parametrize("norm", NORMS)
def test_update_blocks_compile(norm, tmp_path):
    source, kernels = update_source(norm)
    cubin = compile_cuda(source, tmp_path)
    assert cubin[:4] == b"\x7fELF" and all(name.encode() in cubin for name in kernels)


def test_output_blocks_compile(tmp_path):
    source, kernels = output_source()
    cubin = compile_cuda(source, tmp_path)
    assert cubin[:4] == b"\x7fELF" and all(name.encode() in cubin for name in kernels)


def test_compile_errors_are_reported(tmp_path):
    """The check could fail: a harness with a broken line does not compile."""
    source, _ = update_source("none")
    with pytest.raises(Exception, match="undefined|error"):
        compile_cuda(source.replace("const float h =", "const float h = not_a_variable +", 1), tmp_path)


# -- on a GPU: the CUDA printer computes what the torch printer computes ------------------------

def random_inputs(block, P: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cols = []
    for j, name in enumerate(block.inputs):
        if name.startswith("e"):
            col = (torch.rand(P, generator=gen) < 0.7).float()
        else:
            col = torch.randn(P, generator=gen) * (2.0 if name.startswith("w") else 1.0)
        cols.append(col)
    return torch.stack(cols, dim=1).contiguous()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("norm", NORMS)
def test_cuda_blocks_agree_with_torch_printer_on_gpu(norm):
    import cupy

    source, kernels = update_source(norm)
    module = cupy.RawModule(code=source, options=("-std=c++17",))
    P = 4096
    for name, block in kernels.items():
        k = int(name.split("_k")[1])
        inp = random_inputs(block, P, seed=k)
        r = (k - 1) // 2
        # the centre always exists; the template supplies hp = 0 where a neighbour is missing
        names = list(block.inputs)
        inp[:, names.index(f"e{r}")] = 1.0
        for c in range(k):
            inp[:, names.index(f"hp{c}")] *= inp[:, names.index(f"e{c}")]
        inp_gpu = inp.cuda()
        out = torch.full((P, len(block.outputs)), float("nan"), device="cuda")
        fn = module.get_function(name)
        fn(((P + 127) // 128,), (128,), (cupy.asarray(inp_gpu), cupy.asarray(out), cupy.int32(P)))
        torch.cuda.synchronize()
        args = {n: (inp[:, j] != 0) if n.startswith("e") else inp[:, j].double() for j, n in enumerate(names)}
        want = compile_block(block)(**args)
        for j, o in enumerate(block.outputs):
            ref = torch.broadcast_to(torch.as_tensor(want[o], dtype=torch.float64), (P,))
            got = out[:, j].double().cpu()
            assert torch.isfinite(got).all(), (name, o)
            scale = max(ref.abs().max().item(), 1.0)
            assert (got - ref).abs().max().item() <= 1e-5 * scale, (name, o)
