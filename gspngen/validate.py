"""Tensor validation (DESIGN §3, §7): every check runs before any kernel is launched.

Each error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import torch

from .backends.base import result_shape
from .geometry import image_dims
from .spec import Spec

# Floating dtypes torch computes with everywhere (the float8/float4 types are storage-only).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def expected_shapes(spec: Spec, N: int, C: int, H: int, W: int) -> dict[str, tuple[int, ...]]:
    """Shapes of every argument for this spec, in its layout (DESIGN §3)."""
    D, k, G = spec.num_directions, spec.connection, spec.groups(C)
    nhwc = spec.layout == "nhwc"
    pix_c = (H, W, C) if nhwc else (C, H, W)
    pix_g = (H, W, G) if nhwc else (G, H, W)
    shapes = {"x": (N, *pix_c), "w": (N, D, k, *pix_g), "lam": (N, D, *pix_c)}
    if spec.modulation:
        shapes["u"] = (N, D, *pix_c)
    if spec.skip:
        shapes["s"] = (N, D, *pix_c)
    if spec.merge == "learned":
        shapes["m"] = (D,)
    return shapes


def check_whole_groups(spec: Spec, C: int, hint: str | None = None) -> None:
    """ValueError (``hint`` if given, else naming x) unless C channels are whole weight groups; backends
    called directly check this too, before any C / G division."""
    G = spec.groups(C)
    if G < 1 or C % G != 0:
        raise ValueError(hint or f"x: weight_groups={G} must divide the channel count, got C={C}")


def validate_inputs(spec: Spec, x, w, lam, u=None, s=None, m=None) -> None:
    args = {"x": x, "w": w, "lam": lam, "u": u, "s": s, "m": m}
    for name in ("x", "w", "lam"):
        if not isinstance(args[name], torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(args[name]).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: expected a floating-point dtype torch computes with (float16, bfloat16, float32 or "
                        f"float64), got {x.dtype}")
    if x.dim() != 4:
        axes = "(N, H, W, C)" if spec.layout == "nhwc" else "(N, C, H, W)"
        raise ValueError(f"x: expected a 4-d tensor {axes} for layout {spec.layout}, got shape {tuple(x.shape)}")
    N, C, H, W = image_dims(x.shape, spec.layout)
    if min(N, C, H, W) < 1:
        raise ValueError(f"x: expected every dimension >= 1, got shape {tuple(x.shape)}")
    check_whole_groups(spec, C, _layout_mixup(spec, args))
    shapes = expected_shapes(spec, N, C, H, W)
    needs = {"u": ("modulation: true", "modulation: false"), "s": ("skip: true", "skip: false"),
             "m": ("merge: learned", f"merge: {spec.merge}")}
    for name, (used, unused) in needs.items():
        if name in shapes and args[name] is None:
            raise ValueError(f"{name}: required by the spec ({used}), got None")
        if name not in shapes and args[name] is not None:
            raise ValueError(f"{name}: not used by this spec ({unused}), expected None, got a tensor")
    for name, shape in shapes.items():
        t = args[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name}: expected a dense (strided) tensor, got {t.layout}")
        if tuple(t.shape) != shape:
            raise ValueError(_layout_mixup(spec, args) or f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")


def _layout_mixup(spec: Spec, args: dict) -> str | None:
    """If every tensor fits the *other* layout, the caller passed channel-first tensors to a
    channel-last op (or the reverse): say that about x rather than blame the first mismatch."""
    import dataclasses

    other = "nchw" if spec.layout == "nhwc" else "nhwc"
    flipped = dataclasses.replace(spec, layout=other)
    x = args["x"]
    N, C, H, W = image_dims(x.shape, other)
    if C % flipped.groups(C):
        return None
    for name, shape in expected_shapes(flipped, N, C, H, W).items():
        t = args[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            return None
    have = "(N, C, H, W) channel-first" if other == "nchw" else "(N, H, W, C) channel-last"
    want = "(N, H, W, C) channel-last" if other == "nchw" else "(N, C, H, W) channel-first"
    return (f"x: the tensors look {have} (x has shape {tuple(x.shape)}), but the spec's layout is {spec.layout}, "
            f"which expects x as {want}: permute them, or use a spec with layout: {other}")


def validate_backend_inputs(spec: Spec, x, w, lam, u=None, s=None, m=None) -> None:
    """What a backend may assume (gspngen.backends.base): valid and contiguous. The custom ops check it,
    since ``torch.ops.gspngen.scan`` can be called without going through ``gspngen.compile``."""
    validate_inputs(spec, x, w, lam, u, s, m)
    for name, t in (("x", x), ("w", w), ("lam", lam), ("u", u), ("s", s), ("m", m)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor (gspngen.compile's op makes its inputs "
                             f"contiguous), got strides {t.stride()} for shape {tuple(t.shape)}")


def validate_backward_inputs(spec: Spec, gy, x, saved, saved_shape: tuple[int, ...],
                             saved_dtype: torch.dtype) -> None:
    """gy must match the result and ``saved`` what the backend's forward returns (checked before its kernels)."""
    want = result_shape(spec, x)
    if not isinstance(gy, torch.Tensor) or gy.layout != torch.strided or tuple(gy.shape) != want:
        got = tuple(gy.shape) if isinstance(gy, torch.Tensor) else type(gy).__name__
        raise ValueError(f"gy: expected shape {want} (the result's), got {got}")
    if gy.dtype != x.dtype or gy.device != x.device:
        raise TypeError(f"gy: expected dtype {x.dtype} on {x.device} (those of x), got {gy.dtype} on {gy.device}")
    ok = (isinstance(saved, torch.Tensor) and tuple(saved.shape) == tuple(saved_shape) and saved.dtype == saved_dtype
          and saved.device == x.device and saved.is_contiguous())
    if not ok:
        got = (f"shape {tuple(saved.shape)}, dtype {saved.dtype} on {saved.device}"
               if isinstance(saved, torch.Tensor) else type(saved).__name__)
        raise ValueError(f"saved: expected shape {tuple(saved_shape)} and dtype {saved_dtype} on {x.device}, "
                         f"contiguous (what the forward returned), got {got}")
