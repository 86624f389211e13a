"""The ``gspngen`` custom ops: one differentiable op for every spec and backend.

``gspngen::scan`` takes the spec as its normalised JSON and the backend name as
strings, so a single registration serves every spec, works with
``torch.compile`` (no graph breaks) and passes ``torch.library.opcheck``.
Backward is a second op, ``gspngen::scan_backward``, that the backend
implements with its own adjoint kernels (the reference uses autograd).

Both ops check their inputs (``gspngen.validate``) before the backend runs:
they are public (``torch.ops.gspngen.scan``) and callable without
``gspngen.compile``, and a kernel must never read out of bounds (DESIGN §7).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from .backends import get_backend
from .backends.base import result_shape
from .spec import Spec
from .validate import validate_backend_inputs, validate_backward_inputs

Tensor = torch.Tensor


@lru_cache(maxsize=256)
def spec_from_json(spec_json: str) -> Spec:
    import json

    return Spec.from_dict(json.loads(spec_json))


@torch.library.custom_op("gspngen::scan", mutates_args=())
def scan(x: Tensor, w: Tensor, lam: Tensor, u: Optional[Tensor], s: Optional[Tensor], m: Optional[Tensor],
         spec_json: str, backend: str) -> tuple[Tensor, Tensor]:
    """Returns (y, saved): ``saved`` is whatever the backend keeps for backward (maybe empty)."""
    spec = spec_from_json(spec_json)
    impl = get_backend(backend)
    validate_backend_inputs(spec, x, w, lam, u, s, m)
    return impl.forward(spec, x, w, lam, u, s, m)


@scan.register_fake
def _(x, w, lam, u, s, m, spec_json, backend):
    spec = spec_from_json(spec_json)
    shape, dtype = get_backend(backend).saved_shape(spec, x)
    return x.new_empty(result_shape(spec, x)), x.new_empty(shape, dtype=dtype)


@torch.library.custom_op("gspngen::scan_backward", mutates_args=())
def scan_backward(gy: Tensor, x: Tensor, w: Tensor, lam: Tensor, u: Optional[Tensor], s: Optional[Tensor],
                  m: Optional[Tensor], saved: Tensor, spec_json: str, backend: str) -> list[Tensor]:
    """Gradients for (x, w, lam, u, s, m); an empty tensor stands for an unused input."""
    spec = spec_from_json(spec_json)
    impl = get_backend(backend)
    validate_backend_inputs(spec, x, w, lam, u, s, m)
    validate_backward_inputs(spec, gy, x, saved, *impl.saved_shape(spec, x))
    grads = impl.backward(spec, gy.contiguous(), x, w, lam, u, s, m, saved)
    return [g if g is not None else x.new_empty(0) for g in grads]


@scan_backward.register_fake
def _(gy, x, w, lam, u, s, m, saved, spec_json, backend):
    return [torch.empty_like(t) if t is not None else x.new_empty(0) for t in (x, w, lam, u, s, m)]


def _setup_context(ctx, inputs, output):
    x, w, lam, u, s, m, spec_json, backend = inputs
    _, saved = output
    ctx.save_for_backward(x, w, lam, u, s, m, saved)
    ctx.spec_json, ctx.backend = spec_json, backend
    ctx.mark_non_differentiable(saved)


def _backward(ctx, gy, _gsaved):
    x, w, lam, u, s, m, saved = ctx.saved_tensors
    grads = torch.ops.gspngen.scan_backward(gy, x, w, lam, u, s, m, saved, ctx.spec_json, ctx.backend)
    present = (x, w, lam, u, s, m)
    out = [g if t is not None else None for g, t in zip(grads, present)]
    return (*out, None, None)


scan.register_autograd(_backward, setup_context=_setup_context)


# -- autocast ------------------------------------------------------------------
# Under torch.autocast the op runs on one dtype for all its floating inputs:
#   - CPU: float32. The scan is a recurrence over a whole image side, so 16-bit
#     storage would round the hidden state at every step; the CPU backends
#     compute in fp32 anyway, so casting up costs no speed and returns fp32
#     (the next autocast op casts down again as it likes).
#   - CUDA: the autocast dtype (fp16 or bf16) when the backend is a generated
#     kernel (cuda, triton) and the spec's precision lists that dtype: those
#     kernels keep 16-bit storage with fp32 accumulation, which halves memory
#     traffic. float32 otherwise (e.g. fp16 with precision [fp32, bf16]).
# The result has that dtype. The backward op needs no rule: autograd hands it
# tensors of the forward's dtype. float64 inputs are left alone, as autocast does.
_autocast_lib = torch.library.Library("gspngen", "IMPL")


def _autocast_dtype(device_type: str, spec_json: str, backend: str) -> torch.dtype:
    if device_type == "cuda":
        dtype = torch.get_autocast_dtype("cuda")
        name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)
        if backend.split("@")[0] in ("cuda", "triton") and name in spec_from_json(spec_json).precision:
            return dtype
    return torch.float32


def _register_autocast(device_type: str) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, x, w, lam, u, s, m, spec_json, backend):
        dtype = _autocast_dtype(device_type, spec_json, backend)

        def cast(t):
            ok = t is not None and t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64
            return t.to(dtype) if ok else t

        with torch._C._ExcludeDispatchKeyGuard(exclude):
            return torch.ops.gspngen.scan(*(cast(t) for t in (x, w, lam, u, s, m)), spec_json, backend)

    _autocast_lib.impl("scan", kernel, key, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    _register_autocast(_device_type)
