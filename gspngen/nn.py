"""PyTorch modules built on the compiled op: the mixer ``GSPN2d``, a ``GSPNBlock`` and a ``GSPNBackbone``.

Every per-pixel linear map is a matrix product over the channel axis, also in
the nchw layout (``Conv1x1``, ``PatchConv`` keep ``nn.Conv2d``'s parameters):
see ``Conv1x1`` for why (``torch.compile(dynamic=True)`` would otherwise
recompile for every image size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .api import GSPNOp
from .spec import Spec, as_spec

SpecLike = Any  # a Spec, a mapping, a YAML path, or an object with a ``.spec`` (a GSPNOp, a compiled package)


def spec_of(spec: SpecLike) -> Spec:
    """Anything ``gspngen.spec.as_spec`` accepts, or an object with a ``.spec`` attribute holding one."""
    inner = getattr(spec, "spec", None)
    if inner is not None and not isinstance(spec, (str, Path, Mapping)):
        return as_spec(inner)
    return as_spec(spec)


class Conv1x1(nn.Conv2d):
    """A 1x1 convolution (same parameters and state_dict as ``nn.Conv2d(c_in, c_out, 1)``) computed as a
    matrix product over the channel axis.

    Why not ``F.conv2d``: with ``torch.compile(dynamic=True)`` and the default inductor backend,
    torch 2.13 turns the symbolic image size into a constant while it compiles the backward of a
    convolution whose input needs a gradient (``convolution_backward_lowering`` guards on the
    strides of the input gradient, and AOTAutograd restrides the saved convolution outputs to the
    first call's concrete strides), so every new image size recompiled the whole graph. A matrix
    product over the channel axis stays symbolic; on CPU it is as fast as the 1x1 convolution.
    """

    def __init__(self, c_in: int, c_out: int, bias: bool = True):
        super().__init__(c_in, c_out, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (N, H, W, C) @ W^T -> back to (N, O, H, W) (a channels-last view)
        return F.linear(x.movedim(1, -1), self.weight.flatten(1), self.bias).movedim(-1, 1)


def _pointwise(layout: str, c_in: int, c_out: int, bias: bool = True) -> nn.Module:
    """A per-pixel linear map over the channel axis: a 1x1 conv (nchw) or a Linear (nhwc)."""
    return nn.Linear(c_in, c_out, bias=bias) if layout == "nhwc" else Conv1x1(c_in, c_out, bias=bias)


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

    def __init__(self, dim: int, spec: SpecLike, d_state: Optional[int] = None,
                 backend: str = "auto", bias: bool = True):
        super().__init__()
        self.spec = spec_of(spec)
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


# -- building blocks of models -------------------------------------------------


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of an image tensor: axis 1 for nchw, the last axis for nhwc
    (``nn.LayerNorm(dim)``'s parameters and state_dict)."""

    def __init__(self, dim: int, layout: str = "nchw", eps: float = 1e-6):
        super().__init__(dim, eps=eps)
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "nhwc":
            return super().forward(x)
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class PatchConv(nn.Conv2d):
    """A ``kernel_size = stride = patch`` convolution (non-overlapping patches: a patch embedding or a
    2x downsampling) computed as a reshape and a matrix product, for the reason given in ``Conv1x1``.
    Same parameters and state_dict as ``nn.Conv2d(c_in, c_out, patch, stride=patch)``.

    Input (N, c_in, H, W) (``layout="nchw"``) or (N, H, W, c_in) (``"nhwc"``), H and W divisible by
    ``patch``; output (N, c_out, H/patch, W/patch) or (N, H/patch, W/patch, c_out).
    """

    def __init__(self, c_in: int, c_out: int, patch: int, layout: str = "nchw", bias: bool = True):
        super().__init__(c_in, c_out, patch, stride=patch, bias=bias)
        self.patch, self.layout = patch, layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        h_axis = 2 if self.layout == "nchw" else 1
        H, W = x.shape[h_axis], x.shape[h_axis + 1]
        if H % p or W % p:
            raise ValueError(f"x: height and width must be divisible by the patch size {p}, got {H}x{W}")
        if self.layout == "nchw":  # (N, C, H, W) -> (N, C, H/p, p, W/p, p) -> (N, H/p, W/p, C, p, p)
            t = x.unflatten(3, (-1, p)).unflatten(2, (-1, p)).permute(0, 2, 4, 1, 3, 5)
        else:  # (N, H, W, C) -> (N, H/p, p, W/p, p, C) -> (N, H/p, W/p, C, p, p)
            t = x.unflatten(2, (-1, p)).unflatten(1, (-1, p)).permute(0, 1, 3, 5, 2, 4)
        y = F.linear(t.flatten(3), self.weight.flatten(1), self.bias)  # weight (O, C, p, p) -> (O, C*p*p)
        return y if self.layout == "nhwc" else y.movedim(-1, 1)


class GSPNBlock(nn.Module):
    """A GSPN block: ``x + mixer(norm1(x))``, then ``x + mlp(norm2(x))`` (pre-norm residuals).

    The mixer is :class:`GSPN2d` (spatial mixing); the MLP is per pixel: ``dim -> mlp_ratio*dim`` with
    GELU, then back to ``dim``. Norms are LayerNorms over channels.

    Input and output: (N, dim, H, W) for a spec with ``layout: nchw``; (N, H, W, dim) for ``nhwc``.
    ``spec``: a Spec, a mapping, a YAML path, or an object with a ``.spec`` (a ``GSPNOp``, a compiled
    package). ``d_state`` and ``backend`` go to the mixer.
    """

    def __init__(self, dim: int, spec: SpecLike, d_state: Optional[int] = None, mlp_ratio: float = 4.0,
                 backend: str = "auto"):
        super().__init__()
        _check_positive_int("dim", dim)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio: expected a positive number, got {mlp_ratio!r}")
        self.mixer = GSPN2d(dim, spec, d_state=d_state, backend=backend)
        lay = self.mixer.spec.layout
        hidden = max(1, round(dim * mlp_ratio))
        self.norm1 = ChannelLayerNorm(dim, lay)
        self.norm2 = ChannelLayerNorm(dim, lay)
        self.mlp = nn.Sequential(_pointwise(lay, dim, hidden), nn.GELU(), _pointwise(lay, hidden, dim))
        self.dim = dim

    @property
    def spec(self) -> Spec:
        return self.mixer.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GSPNBackbone(nn.Module):
    """A small hierarchical GSPN network: patch embedding, stages of :class:`GSPNBlock`, 2x downsampling
    between stages, and an optional classification head.

    - input: images (N, in_chans, H, W) (always channels first), H and W divisible by
      ``patch_size * 2**(len(dims) - 1)``;
    - stem: a ``patch_size`` x ``patch_size`` patch embedding to ``dims[0]`` channels, then a LayerNorm;
    - stage i: ``depths[i]`` blocks at ``dims[i]`` channels on an (H / (patch_size * 2**i)) x
      (W / (patch_size * 2**i)) grid; between stages a LayerNorm and a 2x2 stride-2 patch merge;
    - ``forward_features(x)``: the list of per-stage outputs in the spec's layout, e.g.
      (N, dims[i], H_i, W_i) for nchw or (N, H_i, W_i, dims[i]) for nhwc;
    - ``forward(x)``: with ``num_classes`` the logits (N, num_classes) (final LayerNorm, global
      ``pool`` -- "mean" or "max" over the grid -- and a Linear); with ``num_classes=None`` the last
      stage's output after the final LayerNorm.

    ``spec`` as for :class:`GSPNBlock`; ``d_state``, ``mlp_ratio`` and ``backend`` go to every block.
    """

    def __init__(self, spec: SpecLike, in_chans: int = 3, dims: Sequence[int] = (32, 64, 128),
                 depths: Sequence[int] = (2, 2, 2), patch_size: int = 4, num_classes: Optional[int] = None,
                 d_state: Optional[int] = None, mlp_ratio: float = 4.0, backend: str = "auto",
                 pool: str = "mean"):
        super().__init__()
        spec = spec_of(spec)
        if pool not in ("mean", "max"):
            raise ValueError(f"pool: expected 'mean' or 'max', got {pool!r}")
        self.pool = pool
        _check_positive_int("in_chans", in_chans)
        _check_positive_int("patch_size", patch_size)
        dims, depths = tuple(dims), tuple(depths)
        if not dims or len(dims) != len(depths):
            raise ValueError(f"dims, depths: expected two non-empty sequences of the same length, "
                             f"got dims={dims} and depths={depths}")
        for i, (d, n) in enumerate(zip(dims, depths)):
            _check_positive_int(f"dims[{i}]", d)
            _check_positive_int(f"depths[{i}]", n)
        if num_classes is not None:
            _check_positive_int("num_classes", num_classes)
        lay = spec.layout
        self.spec, self.dims, self.depths, self.patch_size = spec, dims, depths, patch_size
        self.stem = nn.Sequential(PatchConv(in_chans, dims[0], patch_size, "nchw"), _ToLayout(lay),
                                  ChannelLayerNorm(dims[0], lay))
        self.downsamples = nn.ModuleList(
            nn.Sequential(ChannelLayerNorm(dims[i - 1], lay), PatchConv(dims[i - 1], dims[i], 2, lay))
            for i in range(1, len(dims)))
        self.stages = nn.ModuleList(
            nn.Sequential(*[GSPNBlock(d, spec, d_state=d_state, mlp_ratio=mlp_ratio, backend=backend)
                            for _ in range(n)])
            for d, n in zip(dims, depths))
        self.norm = ChannelLayerNorm(dims[-1], lay)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes is not None else None

    @property
    def reduction(self) -> int:
        """The factor between the input image size and the last stage's grid."""
        return self.patch_size * 2 ** (len(self.dims) - 1)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.stem[0].in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected images (N, {self.stem[0].in_channels}, H, W), got {got}")
        feats = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i:
                x = self.downsamples[i - 1](x)
            x = stage(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.forward_features(x)[-1])
        if self.head is None:
            return x
        grid = (1, 2) if self.spec.layout == "nhwc" else (2, 3)
        return self.head(x.amax(dim=grid) if self.pool == "max" else x.mean(dim=grid))


class _ToLayout(nn.Module):
    """(N, C, H, W) -> the spec's layout (a no-op for nchw)."""

    def __init__(self, layout: str):
        super().__init__()
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1) if self.layout == "nhwc" else x
