"""Print lowered code blocks as CUDA C, CPU C++ (fp32, fp64), Triton, PyTorch or readable text.

Each printer turns one SSA :class:`CodeBlock` into source lines (no
indentation) that define every intermediate and output from the block inputs.
Only a few sympy node types occur in blocks (Add, Mul, integer Pow, Rational,
exp2, pow2, recip, Max, Min, floor, Piecewise on a boolean flag); each printer
maps those.

CUDA: ``exp2f`` (one ex2 instruction, as the runtime builds with -ftz; its
error is 2 ulp whatever the argument, unlike ``__expf``, whose error grows
with |x|), and ``recip`` as the fast reciprocal ``__fdividef(1.0f, x)``
(rcp.approx, <= 1 ulp, no IEEE slow path: the lowering only uses recip where
its argument is in [2^-126, 2^126] or +inf, which __fdividef handles). Sums of
products become ``fmaf`` chains, which fixes the fused rounding whatever the
compiler's ``--fmad`` setting is.
"""

from __future__ import annotations

import sympy as sp
from sympy.codegen.ast import float32, float64, real
from sympy.printing.c import C99CodePrinter
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pycode import PythonCodePrinter
from sympy.printing.str import StrPrinter

from .ir import CodeBlock

LANGS = ("cuda", "cpu", "cpu64", "triton", "torch", "text")


def _int_pow(printer, expr: sp.Pow, one: str) -> str | None:
    """Small integer powers as products: b*b is exact and faster than pow()."""
    e = expr.exp
    if not (e.is_Integer and 1 <= abs(int(e)) <= 4):
        return None
    n = abs(int(e))
    base = printer.parenthesize(expr.base, PRECEDENCE["Mul"])
    prod = "*".join([base] * n)
    if int(e) > 0:
        return f"({prod})" if n > 1 else prod
    return f"({one}/{prod})" if n == 1 else f"({one}/({prod}))"


def _select_chain(printer, expr: sp.Piecewise, select, strict: bool = True) -> str:
    """A Piecewise over boolean flags as nested selections ``select(flag, value, otherwise)``."""
    *cases, (last, cond) = expr.args
    if strict and cond is not sp.true:
        raise ValueError(f"Piecewise without a default branch: {expr}")
    out = printer._print(last)
    for value, flag in reversed(cases):
        out = select(printer._print(flag), printer._print(value), out)
    return out


def _nested(fn: str, args: list[str]) -> str:
    out = args[-1]
    for a in reversed(args[:-1]):
        out = f"{fn}({a}, {out})"
    return out


class CudaPrinter(C99CodePrinter):
    """C99 printer for fp32 device code: ``1.0f`` literals, ``expf``, ``(e ? a : b)``, ``fmaf``.

    The C-family subclasses (CPU fp32 and fp64) differ only in the names below.
    """

    ctype = "float"
    suffix = "f"  # literal suffix
    exp_fn, fma_fn, max_fn, min_fn = "expf", "fmaf", "fmaxf", "fminf"
    floor_fn, pow2_fn = "floorf", "exp2f"  # exp2f of a whole number is exact (a power of two)
    exp2_fn = "exp2f"
    type_alias = float32

    def __init__(self):
        super().__init__(settings={"type_aliases": {real: self.type_alias}})

    def _literal(self, value: float) -> str:
        text = repr(float(value))
        if "e" not in text and "." not in text and "inf" not in text:
            text += ".0"
        return text + self.suffix

    def _print_Float(self, expr):
        return self._literal(float(expr))

    def _print_Integer(self, expr):
        return self._literal(int(expr))  # 0.0f, not 0: every value in a block is fp32

    def _print_Rational(self, expr):
        # A spec constant such as 1/D: one correctly rounded literal.
        return self._literal(int(expr.p) / int(expr.q))

    def _print_Pow(self, expr):
        return _int_pow(self, expr, self._literal(1)) or super()._print_Pow(expr)

    def _print_Piecewise(self, expr):
        return _select_chain(self, expr, lambda flag, value, other: f"({flag} ? {value} : {other})")

    def _print_sigmoid(self, expr):
        one = self._literal(1)
        return f"({one}/({one} + {self.exp_fn}(-{self.parenthesize(expr.args[0], PRECEDENCE['Mul'])})))"

    def _print_Max(self, expr):
        return _nested(self.max_fn, [self._print(a) for a in expr.args])

    def _print_Min(self, expr):
        return _nested(self.min_fn, [self._print(a) for a in expr.args])

    def _print_floor(self, expr):
        return f"{self.floor_fn}({self._print(expr.args[0])})"

    def _print_exp2(self, expr):
        return f"{self.exp2_fn}({self._print(expr.args[0])})"

    def _print_recip(self, expr):
        # the fast reciprocal: safe for recip's range (module docstring)
        return f"__fdividef({self._literal(1)}, {self._print(expr.args[0])})"

    def _print_pow2(self, expr):
        return f"{self.pow2_fn}({self._print(expr.args[0])})"

    def _fma_split(self, term):
        """term = a*b with a, b printable factors, or None if term is not a product."""
        if not term.is_Mul:
            return None
        factors = list(term.args)
        if factors[0] == -1:
            if len(factors) < 3:
                return None
            factors = [-factors[1]] + factors[2:]
        if len(factors) < 2:
            return None
        return factors[0], sp.Mul(*factors[1:])

    def _print_Add(self, expr, order=None):
        terms = self._as_ordered_terms(expr, order=order)
        prods = [self._fma_split(t) for t in terms]
        if sum(p is not None for p in prods) == 0:
            return super()._print_Add(expr, order=order)
        rest = [t for t, p in zip(terms, prods) if p is None]
        fused = [p for p in prods if p is not None]
        if rest:
            acc = self._print(rest[0]) if len(rest) == 1 else super()._print_Add(sp.Add(*rest))
        else:
            a, b = fused.pop()
            acc = f"{self.parenthesize(a, PRECEDENCE['Mul'])}*{self.parenthesize(b, PRECEDENCE['Mul'])}"
        for a, b in reversed(fused):
            acc = f"{self.fma_fn}({self._print(a)}, {self._print(b)}, {acc})"
        return acc


class CpuPrinter(CudaPrinter):
    """CPU fp32: as CUDA, but exp, floor and pow2 are the template's branch-free ``gs_exp``,
    ``gs_floor`` and ``gs_pow2`` (libm's expf and floorf keep GCC from vectorising the loop
    unless -ffast-math, which would also drop NaN/inf semantics), and max/min are plain
    selections, one vmaxps/vminps each: which operand a NaN yields does not matter in the
    blocks, where every max is a stop-gradient shift and a NaN logit makes its own term NaN."""

    exp_fn, floor_fn, pow2_fn, exp2_fn = "gs_exp", "gs_floor", "gs_pow2", "gs_exp2"

    def _print_exp(self, expr):
        return f"{self.exp_fn}({self._print(expr.args[0])})"

    # IEEE division (the CPU's divider runs beside the FMAs): a*recip(b) prints as a/b, one rounding
    def _print_recip(self, expr):
        return f"({self._literal(1)}/({self._print(expr.args[0])}))"

    def _print_Mul(self, expr):
        rs = [f for f in expr.args if isinstance(f, sp.Function) and type(f).__name__ == "recip"]
        if len(rs) != 1:
            return super()._print_Mul(expr)
        num = sp.Mul(*[f for f in expr.args if f is not rs[0]])
        return f"({self.parenthesize(num, PRECEDENCE['Mul'])}/({self._print(rs[0].args[0])}))"

    def _select_extremum(self, expr, op: str) -> str:
        out = self._print(expr.args[-1])
        for a in reversed(expr.args[:-1]):
            a = self._print(a)
            out = f"({a} {op} {out} ? {a} : {out})"
        return out

    def _print_Max(self, expr):
        return self._select_extremum(expr, ">")

    def _print_Min(self, expr):
        return self._select_extremum(expr, "<")


class Cpu64Printer(CpuPrinter):
    """CPU fp64: double literals, libm's accurate ``exp`` and ``fma`` (fp64 must match to 1e-10)."""

    ctype = "double"
    suffix = ""
    exp_fn, fma_fn, exp2_fn = "exp", "fma", "exp2"
    type_alias = float64


class _PyMathPrinter(PythonCodePrinter):
    """Python expressions over a tensor module (``tl`` or ``torch``)."""

    module = ""
    float_integers = False

    def _print_Rational(self, expr):
        return repr(int(expr.p) / int(expr.q))

    def _print_Integer(self, expr):
        return repr(float(int(expr))) if self.float_integers else str(int(expr))

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Pow(self, expr, rational=False):
        return _int_pow(self, expr, "1.0") or super()._print_Pow(expr, rational=rational)

    def _print_Piecewise(self, expr):
        return _select_chain(self, expr, lambda flag, value, other: f"{self.module}.where({flag}, {value}, {other})")

    def _print_exp(self, expr):
        return f"{self.module}.exp({self._print(expr.args[0])})"

    def _print_sigmoid(self, expr):
        return f"{self.module}.sigmoid({self._print(expr.args[0])})"

    def _print_Max(self, expr):
        return _nested(f"{self.module}.maximum", [self._print(a) for a in expr.args])

    def _print_exp2(self, expr):
        return f"{self.module}.exp2({self._print(expr.args[0])})"

    def _print_recip(self, expr):
        return f"(1.0 / ({self._print(expr.args[0])}))"

    def _print_floor(self, expr):
        return f"{self.module}.floor({self._print(expr.args[0])})"

    def _print_pow2(self, expr):
        return f"{self.module}.exp2({self._print(expr.args[0])})"

    def _print_Min(self, expr):
        return _nested(f"{self.module}.minimum", [self._print(a) for a in expr.args])


class TritonPrinter(_PyMathPrinter):
    module = "tl"
    float_integers = True  # a float literal never turns a value into an int tensor


class TorchPrinter(_PyMathPrinter):
    module = "torch"

    def _clamped(self, expr, fn: str, bound: str) -> str:
        # torch.maximum/minimum take tensors only: a constant argument becomes a clamp bound
        consts = [a for a in expr.args if a.is_number]
        rest = [self._print(a) for a in expr.args if not a.is_number]
        out = _nested(f"torch.{fn}", rest) if rest else self._print(expr.func(*consts))
        for c in consts:
            out = f"torch.clamp({out}, {bound}={self._print(c)})"
        return out

    def _print_Max(self, expr):
        return self._clamped(expr, "maximum", "min")

    def _print_Min(self, expr):
        return self._clamped(expr, "minimum", "max")


class TextPrinter(StrPrinter):
    """Readable math for ``gspngen show``: selections read as select(flag, value, otherwise)."""

    def _print_Piecewise(self, expr):
        return _select_chain(self, expr, lambda flag, value, other: f"select({flag}, {value}, {other})", strict=False)


_PRINTERS = {"cuda": CudaPrinter, "cpu": CpuPrinter, "cpu64": Cpu64Printer, "triton": TritonPrinter, "torch": TorchPrinter, "text": TextPrinter}


def print_expr(expr: sp.Expr, lang: str) -> str:
    if lang not in _PRINTERS:
        raise ValueError(f"lang: expected one of {', '.join(LANGS)}, got {lang!r}")
    return _PRINTERS[lang]().doprint(expr)


def print_block(block: CodeBlock, lang: str) -> list[str]:
    """Source lines defining every intermediate and output of ``block`` (contract: gspngen/lower)."""
    if lang not in _PRINTERS:
        raise ValueError(f"lang: expected one of {', '.join(LANGS)}, got {lang!r}")
    printer = _PRINTERS[lang]()
    lines = []
    for sym, rhs in block.assigns:
        code = printer.doprint(rhs)
        if issubclass(_PRINTERS[lang], CudaPrinter):
            # (a real Symbol is also a sympy Boolean: only flags and logic are bool)
            flag = isinstance(rhs, sp.logic.boolalg.Boolean) and not (isinstance(rhs, sp.Symbol) and rhs.is_real)
            ctype = "bool" if flag else printer.ctype
            lines.append(f"const {ctype} {sym.name} = {code};")
        else:
            lines.append(f"{sym.name} = {code}")
    return lines
