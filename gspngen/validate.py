"""Tensor validation (DESIGN §3, §7): every check runs before any kernel is launched.

Each error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import torch

from .spec import Spec


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


def validate_inputs(spec: Spec, x, w, lam, u=None, s=None, m=None) -> None:
    args = {"x": x, "w": w, "lam": lam, "u": u, "s": s, "m": m}
    for name in ("x", "w", "lam"):
        if not isinstance(args[name], torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(args[name]).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point dtype, got {x.dtype}")
    if x.dim() != 4:
        axes = "(N, H, W, C)" if spec.layout == "nhwc" else "(N, C, H, W)"
        raise ValueError(f"x: expected a 4-d tensor {axes} for layout {spec.layout}, got shape {tuple(x.shape)}")
    if spec.layout == "nhwc":
        N, H, W, C = x.shape
    else:
        N, C, H, W = x.shape
    if min(N, C, H, W) < 1:
        raise ValueError(f"x: expected every dimension >= 1, got shape {tuple(x.shape)}")
    G = spec.groups(C)
    if C % G != 0:
        raise ValueError(f"x: weight_groups={G} must divide the channel count, got C={C}")
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
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")
