"""PyTorch modules built on the compiled op."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .api import GSPNOp
from .spec import Spec, as_spec


def _pointwise(layout: str, c_in: int, c_out: int, bias: bool = True) -> nn.Module:
    """A per-pixel linear map over the channel axis: a 1x1 conv (nchw) or a Linear (nhwc)."""
    return nn.Linear(c_in, c_out, bias=bias) if layout == "nhwc" else nn.Conv2d(c_in, c_out, 1, bias=bias)


class GSPN2d(nn.Module):
    """The GSPN mixer block: a 2D spatial propagation layer over ``dim`` channels.

    x --proxy--> f (d_state channels) --compiled GSPN op--> merged --out--> y
    x --heads--> per-direction connection logits w (k*G per direction), lambda,
                 u (if modulation) and skip s (if skip), all 1x1 (per pixel)

    The propagation runs in a small proxy space (d_state channels, 8-16 in the
    GSPN paper) so the scan is cheap; the 1x1 heads make the weights depend on
    the input. lambda goes through a sigmoid (an input gate in (0, 1)); w stays
    a logit (the op normalises it, except with ``normalization: none``); u and
    s are linear. With ``merge: learned`` the D merge weights are a Parameter
    (initialised to 1/D); with ``stack`` the D results are concatenated along
    channels before the output projection.

    Input and output: (N, dim, H, W) for ``layout: nchw``; (N, H, W, dim)
    tokens for ``layout: nhwc``. ``backend`` is any gspngen backend or "auto".
    ``d_state`` defaults to min(dim, 16) and must be divisible by the spec's
    integer ``weight_groups``.
    """

    def __init__(self, dim: int, spec: Union[Spec, Mapping[str, Any], str, Path], d_state: Optional[int] = None,
                 backend: str = "auto", bias: bool = True):
        super().__init__()
        self.spec = as_spec(spec)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive integer, got {dim!r}")
        d_state = min(dim, 16) if d_state is None else d_state
        if not isinstance(d_state, int) or d_state < 1:
            raise ValueError(f"d_state: expected a positive integer, got {d_state!r}")
        G = self.spec.groups(d_state)
        if d_state % G:
            raise ValueError(f"d_state: weight_groups={G} must divide it, got d_state={d_state}")
        self.dim, self.d_state, self.groups = dim, d_state, G
        self.op = GSPNOp(self.spec, backend)
        spec, D, k, lay = self.spec, self.spec.num_directions, self.spec.connection, self.spec.layout
        # Channels of the fused head output, in order: w, lam, [u], [s] (each for all D directions).
        self._split = [D * k * G, D * d_state] + [D * d_state] * (int(spec.modulation) + int(spec.skip))
        self.proxy = _pointwise(lay, dim, d_state, bias)
        self.heads = _pointwise(lay, dim, sum(self._split), bias)
        merged = D * d_state if spec.merge == "stack" else d_state
        self.out = _pointwise(lay, merged, dim, bias)
        self.merge_weights = nn.Parameter(torch.full((D,), 1.0 / D)) if spec.merge == "learned" else None

    @property
    def directions(self) -> tuple[str, ...]:
        return self.spec.directions

    def extra_repr(self) -> str:
        return f"dim={self.dim}, d_state={self.d_state}, spec={self.spec.name!r}, backend={self.op.backend!r}"

    def _per_direction(self, t: torch.Tensor, per: int) -> torch.Tensor:
        """Head output -> (N, D, per, H, W) for nchw, (N, D, H, W, per) for nhwc."""
        D = self.spec.num_directions
        if self.spec.layout == "nhwc":
            N, H, W, _ = t.shape
            return t.reshape(N, H, W, D, per).permute(0, 3, 1, 2, 4)
        N, _, H, W = t.shape
        return t.reshape(N, D, per, H, W)

    def _check_input(self, x: torch.Tensor) -> None:
        nhwc = self.spec.layout == "nhwc"
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1 if nhwc else 1] != self.dim:
            want = f"(N, H, W, {self.dim})" if nhwc else f"(N, {self.dim}, H, W)"
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape {want} for layout {self.spec.layout}, got {got}")

    def _op_inputs(self, x: torch.Tensor) -> dict[str, Optional[torch.Tensor]]:
        self._check_input(x)
        spec = self.spec
        channel_axis = -1 if spec.layout == "nhwc" else 1
        parts = iter(torch.split(self.heads(x), self._split, dim=channel_axis))
        w = self._per_direction(next(parts), spec.connection * self.groups)
        if spec.layout == "nhwc":  # (N, D, H, W, k*G) -> (N, D, k, H, W, G)
            w = w.unflatten(-1, (spec.connection, self.groups)).movedim(-2, 2)
        else:  # (N, D, k*G, H, W) -> (N, D, k, G, H, W)
            w = w.unflatten(2, (spec.connection, self.groups))
        lam = torch.sigmoid(self._per_direction(next(parts), self.d_state))
        u = self._per_direction(next(parts), self.d_state) if spec.modulation else None
        s = self._per_direction(next(parts), self.d_state) if spec.skip else None
        f = self.proxy(x)
        # Under autocast the heads run in 16 bits while the merge weights stay an fp32 Parameter;
        # the op wants one dtype.
        m = None if self.merge_weights is None else self.merge_weights.to(f.dtype)
        return {"x": f, "w": w, "lam": lam, "u": u, "s": s, "m": m}

    def _project_out(self, y: torch.Tensor) -> torch.Tensor:
        if self.spec.merge == "stack":  # (N, D, ...) -> D*d_state channels
            y = y.movedim(1, -2).flatten(-2) if self.spec.layout == "nhwc" else y.flatten(1, 2)
        return self.out(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._project_out(self.op(**self._op_inputs(x)))

    def forward_direction(self, x: torch.Tensor, direction: str) -> torch.Tensor:
        """The output when only ``direction`` propagates (for per-direction affinity maps).

        The other directions get lam = 0 and s = 0, so their share of the merge is
        exactly zero; the output projection's bias is kept.
        """
        if direction not in self.spec.directions:
            raise ValueError(f"direction: expected one of {list(self.spec.directions)}, got {direction!r}")
        inp = self._op_inputs(x)
        keep = torch.zeros(self.spec.num_directions, dtype=inp["lam"].dtype, device=x.device)
        keep[self.spec.directions.index(direction)] = 1
        shape = (1, -1) + (1,) * (inp["lam"].dim() - 2)
        for name in ("lam", "s"):
            if inp[name] is not None:
                inp[name] = inp[name] * keep.view(shape)
        return self._project_out(self.op(**inp))
