"""The ``lowered`` backend: runs the printed PyTorch code of the lowering, forward and adjoint.

Its purpose is to check the derived math on CPU: the per-pixel blocks of
``gspngen.lower`` are printed with the torch printer, compiled once per block
and executed here with the same scan structure the generated kernels have —
a forward loop over steps, and a backward *reverse scan* that runs the printed
adjoint blocks (no torch autograd anywhere). Each step is vectorised over
batch, channels and lanes; any floating dtype works (16-bit is computed in
fp32).

The printed lines are compiled by building a Python function around them and
``exec``-ing it once (cached per block). We do not use ``sympy.lambdify``:
that would print the expressions with its own printer, and the point of this
backend is to execute exactly what :func:`gspngen.lower.print_block` emits.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

from ..geometry import (chunk_starts, from_channel_first, from_frame, image_dims, neighbour_exists,
                        to_channel_first, to_frame)
from ..lower import CodeBlock, lower, print_block
from ..spec import Spec
from ..testing import poison_
from .base import Untuned, compute_dtype, result_shape


@lru_cache(maxsize=None)
def compile_block(block: CodeBlock) -> Callable[..., dict]:
    """A Python function ``f(**inputs) -> {output: value}`` running the block's printed torch code."""
    body = print_block(block, "torch")
    body.append("return {" + ", ".join(f"{o!r}: {o}" for o in block.outputs) + "}")
    src = f"def block({', '.join(block.inputs)}):\n" + "".join(f"    {line}\n" for line in body)
    namespace = {"torch": torch}
    exec(compile(src, "<gspngen.lowered block>", "exec"), namespace)  # noqa: S102 (our own printed code)
    fn = namespace["block"]
    fn.source = src
    return fn


def _full(value, like: torch.Tensor) -> torch.Tensor:
    """A block output as a tensor shaped like ``like`` (printed code may return a broadcastable
    tensor, or a plain number such as the 0 of gx without skip)."""
    if isinstance(value, torch.Tensor):
        return torch.broadcast_to(value, like.shape)
    return torch.full_like(like, value)


class _Direction:
    """The tensors of one direction in its frame: (N, G, Cg, L, T); weights (N, k, G, 1, L, T)."""

    def __init__(self, spec: Spec, d: int, x_cf, w, lam, u, s, cd):
        lay, name = spec.layout, spec.directions[d]
        self.name = name
        N, C = x_cf.shape[:2]
        G = w.shape[-1] if lay == "nhwc" else w.shape[3]
        self.L, self.T = to_frame(x_cf, name).shape[-2:]
        self.grouped = (N, G, C // G, self.L, self.T)

        def frame(t):  # a per-pixel tensor (N, C, H, W) -> (N, G, Cg, L, T)
            return to_frame(t, name).reshape(self.grouped)

        def per_dir(t):
            return None if t is None else frame(to_channel_first(t[:, d], lay).to(cd))

        self.frame = frame
        self.x, self.lam, self.u, self.s = frame(x_cf), per_dir(lam), per_dir(u), per_dir(s)
        self.w = to_frame(to_channel_first(w[:, d], lay).to(cd), name).unsqueeze(3)  # (N, k, G, 1, L, T)
        self.exists = neighbour_exists(self.L, spec.connection, x_cf.device)  # (k, L) bool

    def unframe(self, t: torch.Tensor) -> torch.Tensor:
        """(N, G, Cg, L, T) -> channel-first image frame (N, C, H, W)."""
        N, G, Cg, L, T = t.shape
        return from_frame(t.reshape(N, G * Cg, L, T), self.name)

    def update_inputs(self, k: int, t: int, hp: list[torch.Tensor]) -> dict:
        args = {f"w{c}": self.w[:, c, ..., t] for c in range(k)}
        args.update({f"e{c}": self.exists[c] for c in range(k)})
        args.update({f"hp{c}": hp[c] for c in range(k)})
        args.update(lam=self.lam[..., t], x=self.x[..., t])
        return args

    def output_inputs(self, spec: Spec, m, d: int) -> dict:
        args = {"x": self.x}
        if spec.modulation:
            args["u"] = self.u
        if spec.skip:
            args["s"] = self.s
        if spec.merge == "learned":
            args["md"] = m[d]
        return args


def _neighbours(h_prev: torch.Tensor | None, k: int, r: int, like: torch.Tensor) -> list[torch.Tensor]:
    """hp_c[i] = h_prev[i + c - r], 0 where that lane does not exist or at a chunk start."""
    if h_prev is None:
        zero = torch.zeros_like(like)
        return [zero] * k
    L = h_prev.shape[-1]
    padded = F.pad(h_prev, (r, r))
    return [padded[..., c:c + L] for c in range(k)]


def _gather_prev(ghp: list[torch.Tensor], r: int) -> torch.Tensor:
    """Gradient for h_prev(j) = sum over c of ghp_c at lane j - (c - r)."""
    L = ghp[0].shape[-1]
    buf = ghp[0].new_zeros((*ghp[0].shape[:-1], L + 2 * r))
    for c, g in enumerate(ghp):
        buf[..., c:c + L] += g
    return buf[..., r:r + L]


class LoweredBackend(Untuned):
    name = "lowered"

    def available(self, device: torch.device) -> bool:
        return True  # plain torch: runs wherever torch does

    def saved_shape(self, spec: Spec, x: torch.Tensor):
        N, C, H, W = image_dims(x.shape, spec.layout)
        return (N, spec.num_directions, C, H, W), compute_dtype(x.dtype)

    # -- forward ------------------------------------------------------------
    skips_saved = True  # forward(..., need_saved=False): no saved h (an empty tensor)

    def forward(self, spec: Spec, x, w, lam, u, s, m, need_saved: bool = True):
        ir = lower(spec)
        fwd, out_fn = compile_block(ir.forward), compile_block(ir.output)
        cd = compute_dtype(x.dtype)
        k, r = ir.k, ir.r
        x_cf = to_channel_first(x, spec.layout).to(cd)
        shape, _ = self.saved_shape(spec, x)
        saved = poison_(x_cf.new_empty(shape)) if need_saved else x_cf.new_empty((0,))
        ys = []
        for d in range(spec.num_directions):
            fr = _Direction(spec, d, x_cf, w, lam, u, s, cd)
            hs = poison_(fr.x.new_empty(fr.grouped))
            starts = chunk_starts(fr.T, ir.chunk)
            h = None
            for t in range(fr.T):
                hp = _neighbours(None if starts[t] else h, k, r, fr.x[..., t])
                h = _full(fwd(**fr.update_inputs(k, t, hp))["h"], fr.x[..., t])
                hs[..., t] = h
            if need_saved:
                saved[:, d] = fr.unframe(hs)
            y = out_fn(h=hs, **fr.output_inputs(spec, m, d))["y"]
            ys.append(fr.unframe(_full(y, fr.x)))
        if spec.merge == "stack":
            out = from_channel_first(torch.stack(ys, dim=1), spec.layout)
        else:
            out = from_channel_first(sum(ys), spec.layout)  # the merge factor is inside y
        assert tuple(out.shape) == result_shape(spec, x)
        return out.to(x.dtype).contiguous(), saved

    # -- backward -----------------------------------------------------------
    def backward(self, spec: Spec, gy, x, w, lam, u, s, m, saved):
        ir = lower(spec)
        adj, adj_out = compile_block(ir.adjoint), compile_block(ir.adjoint_output)
        cd = compute_dtype(x.dtype)
        lay, k, r = spec.layout, ir.k, ir.r
        x_cf = to_channel_first(x, lay).to(cd)
        gy_cf = to_channel_first(gy, lay).to(cd)
        # Poisoned outputs: every element must be written by exactly one direction.
        g = {name: poison_(t.new_empty(t.shape, dtype=cd)) for name, t in
             (("w", w), ("lam", lam), ("u", u), ("s", s), ("m", m)) if t is not None}
        gx_cf = torch.zeros_like(x_cf)
        for d in range(spec.num_directions):
            fr = _Direction(spec, d, x_cf, w, lam, u, s, cd)
            hs = fr.frame(saved[:, d].to(cd))
            gyd = fr.frame(gy_cf[:, d] if spec.merge == "stack" else gy_cf)
            ao = adj_out(gy=gyd, h=hs, **fr.output_inputs(spec, m, d))
            gh_out = _full(ao["gh"], fr.x)
            gx_dir = _full(ao["gx"], fr.x).clone()
            if spec.modulation:
                g["u"][:, d] = from_channel_first(fr.unframe(_full(ao["gu"], fr.x)), lay)
            if spec.skip:
                g["s"][:, d] = from_channel_first(fr.unframe(_full(ao["gs"], fr.x)), lay)
            if spec.merge == "learned":
                g["m"][d] = _full(ao["gmd"], fr.x).sum()

            glam = poison_(hs.new_empty(fr.grouped))
            gw = poison_(fr.w.new_empty(fr.w.shape[:3] + fr.w.shape[4:]))  # (N, k, G, L, T)
            starts = chunk_starts(fr.T, ir.chunk)
            carry = None  # gradient into h(t) from step t+1
            for t in reversed(range(fr.T)):
                gh = gh_out[..., t] if carry is None else gh_out[..., t] + carry
                prev = None if starts[t] else hs[..., t - 1]
                hp = _neighbours(prev, k, r, fr.x[..., t])
                o = adj(gh=gh, **fr.update_inputs(k, t, hp))
                pix = fr.x[..., t]
                glam[..., t] = _full(o["glam"], pix)
                gx_dir[..., t] += _full(o["gx"], pix)
                for c in range(k):
                    # a weight group's gradient is the sum over its channels
                    gw[:, c, ..., t] = _full(o[f"gw{c}"], pix).sum(dim=2)
                carry = None if starts[t] else _gather_prev([_full(o[f"ghp{c}"], pix) for c in range(k)], r)
            g["lam"][:, d] = from_channel_first(fr.unframe(glam), lay)
            gw_img = from_frame(gw, fr.name)  # (N, k, G, H, W)
            g["w"][:, d] = from_channel_first(gw_img, lay)
            gx_cf += fr.unframe(gx_dir)
        out = {name: t.to(x.dtype) for name, t in g.items()}
        gx = from_channel_first(gx_cf, lay).to(x.dtype).contiguous()
        return (gx, out["w"], out["lam"], out.get("u"), out.get("s"), out.get("m"))
