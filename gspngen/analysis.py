"""Affinity maps: how strongly each input pixel influences one output pixel.

For an output pixel p the affinity map is

    A[q] = sum over channels of |dy[p] / dx[q]|

computed with one vector-Jacobian product (one backward pass) per map: the
cotangent is 1 on every channel of y at pixel p of batch element ``batch`` and
0 elsewhere, so the full Jacobian is never built.

What the sum over channels means
--------------------------------
A GSPN op never mixes channels (channel ``c`` of y depends on channel ``c`` of
x only), so for an op the single backward pass gives every dy[c, p]/dx[c, q]
exactly and A is the sum of their absolute values. For a layer that mixes
channels (``gspngen.nn.GSPN2d`` projects in and out) the same backward pass
gives ``d(sum_c' y[c', p]) / dx[c, q]``, and A sums *its* absolute value over
the input channels c: signed contributions of different output channels may
partly cancel. That is the price of one backward pass per map.

What "per direction" means
--------------------------
The output is a merge of the per-direction results y_d = u_d*h_d + s_d*x:
sum, mean (1/D), learned (m_d) or stack. The map of direction d is the map of
that direction's share of the output, ``alpha_d * y_d`` with alpha_d = 1, 1/D
or m_d (for ``stack``: the slice y[:, d]). It is computed by running the op of
a single-direction variant of the spec (same k, normalisation, groups, chunk,
modulation, skip, layout; merge ``sum``) on the inputs sliced along D, then
scaling by |alpha_d|. The skip term makes every map non-zero at q = p.
The aggregate is the map of the merged output itself, not the sum of the
per-direction maps: directions may partly cancel (for ``stack`` the D slices
are summed, as with ``merge: sum``).

Layers
------
``affinity`` also accepts any callable of x (e.g. a ``GSPN2d``); then only the
aggregate is defined, unless the callable exposes per-direction contributions
through two attributes: ``directions`` (a tuple of direction names) and
``forward_direction(x, direction)`` (its output when only that direction
propagates). ``GSPN2d`` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch

from .api import GSPNOp
from .geometry import image_dims, to_channel_first
from .spec import Spec

Inputs = Mapping[str, Optional[torch.Tensor]]


@dataclass(frozen=True)
class AffinityMaps:
    """Affinity maps of one output pixel, each a float64 (H, W) CPU tensor.

    ``per_direction`` maps direction names to maps (empty when the layer does
    not expose directions); ``aggregate`` is the map of the full output.
    """

    pixel: tuple[int, int]
    per_direction: dict[str, torch.Tensor]
    aggregate: torch.Tensor

    def panels(self) -> list[tuple[str, torch.Tensor]]:
        """(name, map) in display order: every direction, then the aggregate."""
        return [*self.per_direction.items(), ("aggregate", self.aggregate)]


def single_direction_spec(spec: Spec, direction: str) -> Spec:
    """The spec restricted to one direction, with the same options and a plain sum merge."""
    return dataclasses.replace(spec, directions=(direction,), merge="sum")


def _merge_scale(spec: Spec, d: int, m: Optional[torch.Tensor]) -> float:
    """alpha_d: the factor the merge applies to direction d's result."""
    if spec.merge == "learned":
        return float(m.detach()[d])
    if spec.merge == "mean":
        return 1.0 / spec.num_directions
    return 1.0


def _check_pixel(pixel, H: int, W: int) -> tuple[int, int]:
    ok = (isinstance(pixel, (tuple, list)) and len(pixel) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in pixel))
    if not ok or not (0 <= pixel[0] < H and 0 <= pixel[1] < W):
        raise ValueError(f"pixel: expected (i, j) with 0 <= i < {H} and 0 <= j < {W}, got {pixel!r}")
    return int(pixel[0]), int(pixel[1])


def mark_pixel_(cot: torch.Tensor, batch: int, pixel: tuple[int, int], layout: str) -> None:
    """Set every channel (and direction, for ``stack``) of output pixel ``pixel`` of batch element
    ``batch`` to 1: y is (N, C, H, W) or (N, D, C, H, W), with the channel axis last in nhwc."""
    i, j = pixel
    if layout == "nhwc":
        cot[batch, ..., i, j, :] = 1
    else:
        cot[batch, ..., i, j] = 1


def _pixel_vjp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, pixel: tuple[int, int],
               batch: int, layout: str) -> torch.Tensor:
    """sum_c |d(sum_c' y[c', p]) / dx[c, q]| for batch element ``batch``: one backward pass."""
    xg = x.detach().clone().requires_grad_(True)
    y = fn(xg)
    cot = torch.zeros_like(y)
    mark_pixel_(cot, batch, pixel, layout)
    (gx,) = torch.autograd.grad(y, xg, cot)
    g = to_channel_first(gx[batch], layout)  # (C, H, W)
    return g.detach().abs().sum(dim=0).to(device="cpu", dtype=torch.float64)


def _op_affinity(op: GSPNOp, inputs: Inputs, pixel, batch: int, directions: bool) -> AffinityMaps:
    spec = op.spec
    if not isinstance(inputs, Mapping) or not isinstance(inputs.get("x"), torch.Tensor):
        raise TypeError("inputs: expected a dict of tensors with keys x, w, lam, u, s, m "
                        f"(gspngen.testing.make_inputs), got {type(inputs).__name__}")
    unknown = set(inputs) - {"x", "w", "lam", "u", "s", "m"}
    if unknown:
        raise ValueError(f"inputs: unexpected keys {sorted(unknown)}; expected x, w, lam, u, s, m")
    args = {k: (None if v is None else v.detach()) for k, v in inputs.items()}
    x = args["x"]
    H, W = (x.shape[1], x.shape[2]) if spec.layout == "nhwc" else (x.shape[-2], x.shape[-1])
    if x.dim() == 4 and not 0 <= batch < x.shape[0]:
        raise ValueError(f"batch: expected 0 <= batch < {x.shape[0]}, got {batch}")
    p = _check_pixel(pixel, H, W)
    rest = {k: args.get(k) for k in ("w", "lam", "u", "s", "m")}

    aggregate = _pixel_vjp(lambda xx: op(xx, **rest), x, p, batch, spec.layout)
    per: dict[str, torch.Tensor] = {}
    if directions:
        for d, name in enumerate(spec.directions):
            sub = GSPNOp(single_direction_spec(spec, name), op.backend)
            # D is axis 1 of w, lam, u and s in both layouts.
            sliced = {k: (None if rest[k] is None else rest[k][:, d:d + 1]) for k in ("w", "lam", "u", "s")}
            scale = abs(_merge_scale(spec, d, rest["m"]))
            per[name] = scale * _pixel_vjp(lambda xx: sub(xx, **sliced), x, p, batch, spec.layout)
    return AffinityMaps(p, per, aggregate)


def _layer_affinity(layer: Callable, x: torch.Tensor, pixel, batch: int, layout: Optional[str],
                    directions: bool) -> AffinityMaps:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"inputs: expected the input tensor x for a layer, got {type(x).__name__}")
    if layout is None:
        spec = getattr(layer, "spec", None)
        layout = spec.layout if isinstance(spec, Spec) else "nchw"
    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"layout: expected nchw or nhwc, got {layout!r}")
    if x.dim() != 4:
        raise ValueError(f"inputs: expected a 4-d input x, got shape {tuple(x.shape)}")
    if not 0 <= batch < x.shape[0]:
        raise ValueError(f"batch: expected 0 <= batch < {x.shape[0]}, got {batch}")
    _, _, H, W = image_dims(x.shape, layout)
    p = _check_pixel(pixel, H, W)
    aggregate = _pixel_vjp(layer, x, p, batch, layout)
    per: dict[str, torch.Tensor] = {}
    names = getattr(layer, "directions", None)
    forward_direction = getattr(layer, "forward_direction", None)
    if directions and names and callable(forward_direction):
        for name in names:
            per[name] = _pixel_vjp(lambda xx: forward_direction(xx, name), x, p, batch, layout)
    return AffinityMaps(p, per, aggregate)


def affinity(op: Union[GSPNOp, Callable[[torch.Tensor], torch.Tensor]], inputs: Union[Inputs, torch.Tensor],
             pixel: tuple[int, int], *, batch: int = 0, layout: Optional[str] = None,
             directions: bool = True) -> AffinityMaps:
    """Affinity maps of output pixel ``pixel`` = (row, column) (see the module docstring).

    op: a ``gspngen.compile(...)`` op, with ``inputs`` a dict x, w, lam, u, s, m
    (as from ``gspngen.testing.make_inputs``); or a callable of x (a layer), with
    ``inputs`` the tensor x (or a dict holding it under "x") and ``layout`` its
    channel position (default: the layer's ``spec.layout``, else nchw).
    Works through any backend; ``directions=False`` computes the aggregate only.
    """
    if isinstance(op, GSPNOp):
        if layout is not None and layout != op.spec.layout:
            raise ValueError(f"layout: the op's spec has layout {op.spec.layout!r}, got {layout!r}")
        return _op_affinity(op, inputs, pixel, batch, directions)
    if not callable(op):
        raise TypeError(f"op: expected a gspngen op or a callable of x, got {type(op).__name__}")
    x: Any = inputs["x"] if isinstance(inputs, Mapping) else inputs
    return _layer_affinity(op, x, pixel, batch, layout, directions)
