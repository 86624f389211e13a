"""The lowering: a spec becomes a :class:`KernelIR` of index maps and derived per-pixel code.

Contract (renderers rely on it; only ever extend it)::

    from gspngen.lower import lower, print_block
    ir = lower(spec)                       # cached per spec
    lines = print_block(ir.adjoint, "cuda")   # or "triton" | "torch" (| "text")

Blocks and their variables:

- ``forward``: inputs w0..w{k-1} (raw logits or weights), e0..e{k-1} (neighbour
  c, lane i+c-r, exists), hp0..hp{k-1} (previous-line h, 0 where missing or at
  a chunk start), lam, x; output h. The normalisation is inside.
- ``output``: inputs h, x (+u, s, md as used); output y, this direction's
  contribution to the merged output (merge factor included).
- ``adjoint``: inputs gh and the forward inputs; outputs glam, gx, gw0..,
  ghp0.. (ghp_c is the gradient for h(t-1, lane i+c-r)).
- ``adjoint_output``: inputs gy, h, x (+u, s, md); outputs gh, gx, gu, gs,
  gmd as used (gmd is this pixel's share of dL/dm[d]).

Additions beyond the contract: ``CodeBlock.used_inputs`` (inputs the code reads;
e.g. the centre's flag never is), ``CodeBlock.count_ops()``, ``KernelIR.normalization /
modulation / skip / blocks``, ``DirectionIR.pixel_offset / batch_stride / extents``,
and the "text" language (readable math, used by ``gspngen show``).

The math is derived in :mod:`gspngen.lower.derive`; see it for the design.
"""

from __future__ import annotations

from functools import lru_cache

from ..geometry import DIRECTION_TABLE
from ..spec import Spec
from .derive import output_blocks, update_blocks
from .ir import C, H, N, W, CodeBlock, DirectionIR, KernelIR
from .printers import LANGS, print_block, print_expr

__all__ = ["lower", "print_block", "print_expr", "LANGS", "CodeBlock", "DirectionIR", "KernelIR", "N", "C", "H", "W"]


def lower(spec: Spec) -> KernelIR:
    """Lower a validated spec (cached). Blocks are shared between specs that need the same math."""
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a gspngen.Spec, got {type(spec).__name__}")
    return _lower(spec)


@lru_cache(maxsize=256)
def _lower(spec: Spec) -> KernelIR:
    directions = tuple(
        DirectionIR(name=name, index=d, step_axis=DIRECTION_TABLE[name].step_axis,
                    lane_axis=DIRECTION_TABLE[name].lane_axis, reverse=DIRECTION_TABLE[name].reverse,
                    layout=spec.layout)
        for d, name in enumerate(spec.directions)
    )
    forward, adjoint = update_blocks(spec.connection, spec.normalization)
    output, adjoint_output = output_blocks(spec.modulation, spec.skip, spec.merge, spec.num_directions)
    return KernelIR(
        spec=spec, k=spec.connection, r=spec.radius, directions=directions, chunk=spec.chunk,
        merge=spec.merge, layout=spec.layout, precision=spec.precision,
        forward=forward, output=output, adjoint=adjoint, adjoint_output=adjoint_output,
        normalization=spec.normalization, modulation=spec.modulation, skip=spec.skip,
    )
