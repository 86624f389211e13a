"""Render a spec's Triton kernels (forward and backward) from ``templates/triton``.

The templates hold launch structure and memory access only. Everything a
template needs from the spec arrives here as validated numbers, booleans and
the printed code of the lowering (:func:`gspngen.lower.print_block`); index
maps become integer expressions over the kernel's int64 size scalars.
"""

from __future__ import annotations

import sympy as sp

from .. import __version__
from ..lower import lower, print_block
from ..lower.ir import C, H, W, CodeBlock, DirectionIR
from ..spec import Spec
from .templates import render

from . import TRITON_FILE as KERNEL_FILE  # noqa: E402

# Size symbols -> the kernel's int64 scalars (see the template's geometry macro).
_G = sp.Symbol("G", integer=True, positive=True)
_KERNEL_NAMES = {H: "H64", W: "W64", C: "C64", _G: "G64"}

# Printed blocks are inlined into the kernels' step loops (a call to a nested
# @jit function costs the interpreter a re-patch of triton.language per call,
# about a third of CI's kernel time). Inlined, names must not clash: each
# block's CSE temporaries get a prefix, and outputs whose contract name is
# used by two blocks of one loop body (``gx``, ``gh``) get a local name.
_PREFIX = {"forward": "f_", "output": "o_", "adjoint": "a_", "adjoint_output": "ao_"}
_RENAME = {
    "adjoint": {"gx": "gx_lam"},
    "adjoint_output": {"gh": "gh_out", "gx": "gx_out"},
}


def _int_expr(expr: sp.Expr) -> str:
    """A Triton int64 scalar expression for an integer index-map expression."""
    expr = sp.expand(sp.sympify(expr))
    for atom in expr.atoms(sp.Symbol):
        if atom not in _KERNEL_NAMES:
            raise ValueError(f"index map uses unknown size symbol {atom}")
    if any(a.is_Rational and not a.is_Integer for a in expr.atoms(sp.Rational)):
        raise ValueError(f"index map is not an integer expression: {expr}")
    if expr.is_Integer:
        # A bare literal would be a constexpr; add the int64 zero so every
        # branch of the direction table yields the same scalar type.
        value = int(expr)
        return f"z64 + {value}" if value >= 0 else f"z64 - {-value}"
    return sp.sstr(expr.xreplace({s: sp.Symbol(n) for s, n in _KERNEL_NAMES.items()}))


def _geometry(d: DirectionIR) -> dict:
    L, T = d.extents()
    maps = {}
    for key, size in (("c", C), ("g", _G)):
        step, lane, chan, base = d.strides(size)
        maps[key] = {"step": _int_expr(step), "lane": _int_expr(lane), "chan": _int_expr(chan),
                     "base": _int_expr(base), "batch": _int_expr(d.batch_stride(size))}
    return {"index": d.index, "name": d.name, "L": _int_expr(L), "T": _int_expr(T), **maps}


def _block(name: str, block: CodeBlock) -> dict:
    """A block's printed lines, renamed for inlining; its inputs are the template's variables."""
    rename = _RENAME.get(name, {})
    for var in block.inputs + block.outputs:
        if var.startswith("cse"):
            raise ValueError(f"block {name}: variable {var} collides with CSE temporaries")
    new_names = {}
    for sym, _ in block.assigns:
        if sym.name in rename:
            new_names[sym] = rename[sym.name]
        elif sym.name not in block.outputs:
            new_names[sym] = _PREFIX[name] + sym.name
    subs = {sym: sp.Symbol(new, **sym.assumptions0) for sym, new in new_names.items()}
    renamed = CodeBlock(
        inputs=block.inputs,
        outputs=tuple(rename.get(o, o) for o in block.outputs),
        assigns=tuple((subs.get(sym, sym), rhs.xreplace(subs)) for sym, rhs in block.assigns),
    )
    return {"outputs": list(renamed.outputs), "lines": print_block(renamed, "triton")}


def render_context(spec: Spec) -> dict:
    """Everything the Triton templates read, for one spec."""
    ir = lower(spec)
    blocks = {name: _block(name, b) for name, b in ir.blocks.items()}
    adj_out = set(ir.adjoint_output.outputs)
    wanted = {"gu": ir.modulation, "gs": ir.skip, "gmd": ir.merge == "learned"}
    for name, used in wanted.items():
        if (name in adj_out) != used:
            raise ValueError(f"adjoint_output block: output {name} {'missing' if used else 'unexpected'} "
                             f"for spec '{spec.name}'")
    return {
        "version": __version__,
        "spec": spec,
        "spec_hash": spec.hash,
        "k": ir.k,
        "r": ir.r,
        "offsets": [c - ir.r for c in range(ir.k)],
        "weight_names": [f"w{c}" for c in range(ir.k)],
        "hp_names": [f"hp{c}" for c in range(ir.k)],
        "num_directions": ir.num_directions,
        "directions": [_geometry(d) for d in ir.directions],
        "chunk": ir.chunk,
        "stack": ir.merge == "stack",
        "learned": ir.merge == "learned",
        "modulation": ir.modulation,
        "skip": ir.skip,
        "blocks": blocks,
        # the skip path's share of gx (the contract prints 0 without skip)
        "has_gx_out": "gx" in adj_out,
    }


def render_kernels(spec: Spec) -> str:
    """The source of the Triton kernel module for ``spec`` (deterministic)."""
    return render("triton/kernels.py.j2", **render_context(spec))


def render_files(spec: Spec) -> dict[str, str]:
    """Files for ``gspngen compile``: filename -> source text."""
    return {KERNEL_FILE: render_kernels(spec)}
