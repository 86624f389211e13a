"""The lowered IR: what a renderer needs to emit a GSPN kernel, and nothing it must invent.

A :class:`KernelIR` holds, for one spec, the scan geometry of every direction
(as symbolic index maps over the size symbols ``N, C, H, W``) and four
straight-line :class:`CodeBlock` s for one pixel: the forward update, the
direction's output contribution, and their adjoints. Templates supply memory
access and launch structure; all GSPN math lives in the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy as sp

# Size symbols of a per-pixel tensor; C is "the channel count of that tensor"
# (pass G for weights). Positive integers, so index maps simplify cleanly.
N, C, H, W = sp.symbols("N C H W", integer=True, positive=True)


@dataclass(frozen=True)
class CodeBlock:
    """Straight-line SSA code for one pixel, after common-subexpression elimination.

    ``assigns`` defines each symbol once, in order; intermediates are named
    ``cse0, cse1, ...`` and every name in ``outputs`` is assigned exactly once.
    Expressions only read ``inputs`` and earlier assignments.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    assigns: tuple[tuple[sp.Symbol, sp.Expr], ...]

    def expr(self, name: str) -> sp.Expr:
        """The right-hand side assigned to ``name``."""
        for sym, rhs in self.assigns:
            if sym.name == name:
                return rhs
        raise KeyError(name)

    @property
    def used_inputs(self) -> tuple[str, ...]:
        """The inputs the code actually reads, in input order. Some never are: the centre's
        flag (it always exists), or the weight of k = 1 (it normalises to 1). A template
        may skip loading the others (and avoid unused-variable warnings)."""
        used = set().union(*(rhs.free_symbols for _, rhs in self.assigns)) if self.assigns else set()
        names = {s.name for s in used}
        return tuple(n for n in self.inputs if n in names)

    def count_ops(self) -> int:
        """Arithmetic operations of the whole block (sympy's count, selections included)."""
        return sum(int(sp.count_ops(rhs)) for _, rhs in self.assigns)


@dataclass(frozen=True)
class DirectionIR:
    """One scan direction: axes and the memory index maps of a per-pixel tensor.

    A pixel is addressed by batch ``n``, channel (or weight group) ``ch``, step
    ``t`` in step order (0 is the first line the scan visits) and lane ``i`` on
    the neighbour axis (image coordinates, never flipped).
    """

    name: str  # 'lr' | 'rl' | 'tb' | 'bt'
    index: int  # position d in spec.directions (the D axis)
    step_axis: str  # 'H' | 'W'
    lane_axis: str
    reverse: bool
    layout: str  # 'nchw' | 'nhwc'

    def extents(self) -> tuple[sp.Expr, sp.Expr]:
        """(L, T): number of lanes and of steps, as size symbols."""
        return (H, W) if self.step_axis == "W" else (W, H)

    def image_coords(self, t, i) -> tuple[sp.Expr, sp.Expr]:
        """(row, col) image coordinates of step t, lane i."""
        _, T = self.extents()
        step = (T - 1 - t) if self.reverse else t
        return (i, step) if self.step_axis == "W" else (step, i)

    def _axis_strides(self, c: sp.Expr) -> dict[str, sp.Expr]:
        if self.layout == "nhwc":
            return {"n": H * W * c, "H": W * c, "W": c, "ch": sp.Integer(1)}
        return {"n": c * H * W, "ch": H * W, "H": W, "W": sp.Integer(1)}

    def strides(self, C: sp.Expr = C) -> tuple[sp.Expr, sp.Expr, sp.Expr, sp.Expr]:
        """(stride_step, stride_lane, stride_channel, base_of_step0) in elements.

        A reversed direction walks memory backwards: its step stride is negative
        and step 0 sits at (T-1)*|stride_step|, so that
        offset = base + t*stride_step + i*stride_lane + ch*stride_channel.
        """
        s = self._axis_strides(sp.sympify(C))
        _, T = self.extents()
        step = s[self.step_axis]
        if self.reverse:
            return (-step, s[self.lane_axis], s["ch"], (T - 1) * step)
        return (step, s[self.lane_axis], s["ch"], sp.Integer(0))

    def batch_stride(self, C: sp.Expr = C) -> sp.Expr:
        return self._axis_strides(sp.sympify(C))["n"]

    def pixel_offset(self, ch, t, i, C: sp.Expr = C) -> sp.Expr:
        """Offset of (ch, t, i) inside one image (batch element) of a per-pixel tensor."""
        ss, sl, sc, base = self.strides(C)
        return sp.expand(base + sp.sympify(t) * ss + sp.sympify(i) * sl + sp.sympify(ch) * sc)

    def offset(self, n, ch, t, i, C: sp.Expr = C) -> sp.Expr:
        """Element offset of (n, ch, t, i) in a contiguous per-pixel tensor of the spec's layout."""
        return sp.expand(sp.sympify(n) * self.batch_stride(C) + self.pixel_offset(ch, t, i, C))


@dataclass(frozen=True)
class KernelIR:
    """Everything a renderer needs for one spec (see the contract in gspngen/lower/__init__.py)."""

    spec: Any  # gspngen.spec.Spec (Any: avoid an import cycle for type checkers)
    k: int
    r: int
    directions: tuple[DirectionIR, ...]
    chunk: int | None
    merge: str
    layout: str
    precision: tuple[str, ...]
    forward: CodeBlock
    output: CodeBlock
    adjoint: CodeBlock
    adjoint_output: CodeBlock
    # Additions beyond the contract's required fields (renderers may ignore them).
    normalization: str = "stability"
    modulation: bool = True
    skip: bool = True

    @property
    def num_directions(self) -> int:
        return len(self.directions)

    @property
    def blocks(self) -> dict[str, CodeBlock]:
        return {"forward": self.forward, "output": self.output,
                "adjoint": self.adjoint, "adjoint_output": self.adjoint_output}
