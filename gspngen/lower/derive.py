"""Derive the per-pixel GSPN math with sympy: forward programs and their adjoints.

The forward update is written once, as a small SSA program of local
assignments (DESIGN §4)::

    ws_c = select(e_c, w_c, 0)              # sanitise: garbage logits never reach arithmetic
    a_c  = select(e_c, sigmoid(ws_c), 0)    # stability  (softmax: exp(ws_c - mx))
    Z    = a_0 + ... + a_{k-1}
    wn_c = a_c * recip(Z)                   # one reciprocal, k products
    h    = lam*x + wn_0*hp_0 + ... + wn_{k-1}*hp_{k-1}

The adjoint is *derived*, never written by hand: reverse-mode accumulation
walks the program backwards and takes every local partial derivative with
``sympy.diff``. Because Z is one node, its adjoint is one sum shared by all k
weights, so the normalisation's vector-Jacobian product costs O(k) rather
than the O(k^2) of differentiating each wn_c as a whole. Finally each block is
flattened and passed through ``sympy.cse`` so every sigmoid/exp is computed
once.

The forms are chosen for the GPUs, whose exponential and reciprocal units
compute 2^x and an approximate 1/x in one instruction: exponentials are base 2
(``exp2``) with log2(e) folded into the argument's one multiply-add, and every
division is a ``recip`` of an argument known to lie in [2^-126, 2^126] (or be
+inf), which a fast reciprocal handles within 1 ulp. Each backend prints the
same forms (gspngen/lower/printers.py): the CPU prints recip as an IEEE
division.

Softmax subtracts mx = max over the existing logits before exp. The result
does not depend on mx (it cancels between numerator and Z), so mx is a
stop-gradient node: its true contribution to any gradient is exactly zero,
and skipping it avoids differentiating the non-smooth Max.

The centre neighbour (offset 0, c = r) is the pixel's own lane and always
exists, so ``e_r`` is replaced by True before differentiation; its flag stays
a block input so every template passes the same variables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import sympy as sp

from .ir import CodeBlock


class sigmoid(sp.Function):  # noqa: N801  (printed by name: tl.sigmoid, torch.sigmoid)
    """The logistic function; its derivative reuses its own value, so CSE shares it."""

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)


class pow2(sp.Function):  # noqa: N801  (printed by name: exp2f, gs_pow2, tl.exp2, torch.exp2)
    """2**n for an integer-valued n: a power of two, which every backend builds in a few integer
    operations or one instruction (no polynomial); 0 below the smallest normal number (as an
    exponential flushed to zero)."""

    nargs = 1

    @classmethod
    def eval(cls, n):
        if n.is_number and n.is_integer:
            return sp.Integer(2) ** n  # exact, as sympy evaluates it (the backends flush tiny ones)
        return None

    def fdiff(self, argindex=1):
        return sp.log(2) * pow2(self.args[0])


class exp2(sp.Function):  # noqa: N801  (printed by name: exp2f, gs_exp2, tl.exp2, torch.exp2, exp2)
    """2**x for a real x. Base 2 because the GPUs' exponential unit computes 2**x (ex2): exp2f is one
    instruction when flushing to zero, where expf adds a range reduction around it; the lowering
    folds log2(e) into the argument's one multiply-add."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return sp.Integer(2) ** x
        return None

    def fdiff(self, argindex=1):
        return sp.log(2) * exp2(self.args[0])


class recip(sp.Function):  # noqa: N801  (printed by name: a fast reciprocal on GPUs, 1/x elsewhere)
    """1/x for an x the lowering knows to lie in [2**-126, 2**126] (or be +inf): there a hardware
    approximate reciprocal (rcp.approx, <= 1 ulp) is exact enough and needs no IEEE slow path.
    Each use says why its argument is in range. Printed as the GPU's fast reciprocal (CUDA) or
    a plain division (CPU, whose divider runs beside the FMAs; Triton, torch)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return 1 / x
        return None

    def fdiff(self, argindex=1):
        return -recip(self.args[0]) ** 2


def select(flag: sp.Symbol, value: sp.Expr, otherwise: sp.Expr) -> sp.Expr:
    """``value`` where ``flag`` holds, else ``otherwise`` (printed as ?:, tl.where, torch.where)."""
    return sp.Piecewise((value, flag), (otherwise, True))


def real(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)


@dataclass
class Program:
    """Straight-line SSA assignments; ``stop`` names nodes no gradient flows through."""

    assigns: list[tuple[sp.Symbol, sp.Expr]] = field(default_factory=list)
    stop: set[sp.Symbol] = field(default_factory=set)
    subs: dict = field(default_factory=dict)  # facts applied to every assignment (the centre exists)
    # node -> {argument: local partial derivative} where a shorter equivalent form of
    # sympy.diff's result is known (e.g. written in terms of the node itself); a test checks
    # each against sympy.diff
    partials: dict = field(default_factory=dict)

    def node(self, name: str, expr: sp.Expr, *, stop_gradient: bool = False,
             partials: dict | None = None) -> sp.Symbol:
        sym = real(name)
        self.assigns.append((sym, sp.sympify(expr).xreplace(self.subs)))
        if stop_gradient:
            self.stop.add(sym)
        if partials:
            self.partials[sym] = {k: sp.sympify(d).xreplace(self.subs) for k, d in partials.items()}
        return sym


def reverse_mode(program: Program, seeds: dict[sp.Symbol, sp.Expr], wrt: list[sp.Symbol]) -> tuple[Program, dict]:
    """Adjoint program of ``program`` given output adjoints ``seeds``.

    Returns the adjoint assignments (one ``g_<node>`` per node, SSA) and the
    gradient expression of every symbol in ``wrt``. Flags (boolean symbols) and
    stop-gradient nodes receive nothing.
    """
    differentiable = set(wrt) | {s for s, _ in program.assigns}
    contrib: dict[sp.Symbol, list[sp.Expr]] = {s: [g] for s, g in seeds.items()}
    adj = Program()
    for v, f in reversed(program.assigns):
        if v not in contrib or v in program.stop:
            continue
        # Every use of v comes later in the program, so its adjoint is complete here.
        gv = adj.node("g_" + v.name, sp.Add(*contrib[v]))
        for s in sorted(f.free_symbols & (differentiable - program.stop), key=lambda s: s.name):
            # d exp(g) = exp(g) dg: name the node instead of repeating its expression, so that
            # folding selections into the adjoint does not split exp(select(...)) into one
            # exponential per branch
            d = program.partials.get(v, {}).get(s)
            if d is None:
                d = sp.diff(f, s).xreplace({f: v})
            if d != 0:
                # piecewise_fold moves the adjoint inside the selection: (e ? gv*d : 0)
                contrib.setdefault(s, []).append(sp.piecewise_fold(gv * d))
    grads = {s: sp.Add(*contrib.get(s, [sp.Integer(0)])) for s in wrt}
    return adj, grads


def finish_block(inputs: list[str], outputs: list[tuple[str, sp.Expr]], *programs: Program) -> CodeBlock:
    """Flatten the programs into the outputs, then eliminate common subexpressions.

    ``factor_terms`` first pulls common factors out of sums, so e.g. the normalisation's
    gradient takes the form (gh/Z)*a_c*(hp_c - sum_c' wn_c'*hp_c'): fewer operations and no 1/Z^2.
    """
    env: dict[sp.Symbol, sp.Expr] = {}
    for prog in programs:
        for sym, rhs in prog.assigns:
            env[sym] = rhs.xreplace(env)
    flat = [sp.factor_terms(sp.sympify(expr).xreplace(env)) for _, expr in outputs]
    repl, reduced = sp.cse(flat, symbols=sp.numbered_symbols("cse", real=True))
    assigns = list(repl) + [(real(name), expr) for (name, _), expr in zip(outputs, reduced)]
    return CodeBlock(tuple(inputs), tuple(name for name, _ in outputs), tuple(assigns))


@dataclass(frozen=True)
class UpdateSymbols:
    w: tuple[sp.Symbol, ...]
    e: tuple[sp.Symbol, ...]
    hp: tuple[sp.Symbol, ...]
    lam: sp.Symbol
    x: sp.Symbol

    @property
    def names(self) -> list[str]:
        return [s.name for s in (*self.w, *self.e, *self.hp, self.lam, self.x)]


def update_symbols(k: int) -> UpdateSymbols:
    return UpdateSymbols(
        w=tuple(real(f"w{c}") for c in range(k)),
        e=tuple(sp.Symbol(f"e{c}") for c in range(k)),
        hp=tuple(real(f"hp{c}") for c in range(k)),
        lam=real("lam"), x=real("x"),
    )


def update_program(k: int, normalization: str) -> tuple[Program, sp.Symbol, UpdateSymbols]:
    """The forward SSA program of one pixel's update; returns (program, h, symbols)."""
    r = (k - 1) // 2
    v = update_symbols(k)
    p = Program(subs={v.e[r]: sp.true})  # the centre always exists
    # A missing neighbour's logit is replaced before any arithmetic: by 0 for raw weights, by the
    # centre's logit when normalising, so that exponentials of it stay <= 1 (no inf to select away)
    # (a stop-gradient node: no gradient may reach the centre through a neighbour that does not
    # exist, where its value could be anything, inf included)
    fill = 0 if normalization == "none" else p.node("_fill", v.w[r], stop_gradient=True)
    ws = [p.node(f"_ws{c}", select(v.e[c], v.w[c], fill)) for c in range(k)]
    if normalization == "none":
        wn = ws
    else:
        # Fill non-existing entries with the centre logit: mx is then the max over
        # existing logits exactly. It is a stop-gradient scale: it cancels in a_c / Z.
        mx = p.node("_mx", sp.Max(*[select(v.e[c], ws[c], ws[r]) for c in range(k)]), stop_gradient=True)
        if k == 1:
            a = [sp.Integer(1)]  # one neighbour, the centre: its weight normalises to 1
        elif normalization == "stability":
            a = [p.node(f"_a{c}", select(v.e[c], scaled_sigmoid(p, c, ws[c], mx), 0)) for c in range(k)]
        elif normalization == "softmax":
            # exp(ws - mx) = 2^(ws log2e - mx log2e) <= 1, so Z >= 1; one multiply-add per neighbour
            # (mx log2e is shared; its rounding is common to every term and cancels in a_c / Z)
            mxl = p.node("_mxl", mx * LOG2E, stop_gradient=True)
            ex = [p.node(f"_x{c}", exp2(ws[c] * LOG2E - mxl), partials={ws[c]: real(f"_x{c}")})
                  for c in range(k)]
            a = [p.node(f"_a{c}", select(v.e[c], ex[c], 0)) for c in range(k)]
        else:
            raise ValueError(f"normalization: expected stability, softmax or none, got {normalization!r}")
        z = p.node("_Z", sp.Add(*a))
        # One reciprocal, then k products. Z is in range for recip: stability's largest term is in
        # [1/2, 2) (see scaled_sigmoid) and every term < 2, softmax's largest is 1, so 1/2 <= Z <= 2k.
        rz = p.node("_rZ", recip(z))
        wn = [p.node(f"_wn{c}", a[c] * rz) for c in range(k)]
    h = p.node("_h", v.lam * v.x + sp.Add(*[wn[c] * v.hp[c] for c in range(k)]))
    return p, h, v


LOG2E = sp.Float("1.44269504088896340735992468100189214", 40)


def scaled_sigmoid(p: Program, c: int, a: sp.Symbol, mx: sp.Symbol) -> sp.Symbol:
    """q_c = sigmoid(a) / 2^n with n = floor(log2(e) * min(mx, 0)): the stability weight before
    normalisation, exact for every finite logit.

    sigmoid(a) / sum sigmoid(a') underflows to 0/0 once every logit is below about -88 (fp32),
    although the ratio is well defined (it tends to a softmax of the logits). Scaling every
    term by 2^-n, n ln2 within ln2 below the largest existing logit clamped at 0, cancels in the
    ratio and keeps the largest term in [1/2, 2). With t = n - a log2(e) (one multiply-add):

        q = sigmoid(a) / 2^n = 1 / (2^n + 2^n e^-a) = 1 / (2^t + 2^n)

    one base-2 exponential per neighbour and one reciprocal, no branch and no clamp. 2^n
    (``_eb``) is a power of two, built from its exponent bits rather than a further exponential.
    The reciprocal's argument is in [1/2, +inf] (recip's range): a <= mx gives t > -1 when
    mx < 0, and 2^n = 1 when mx >= 0. The limits come out right without a selection: a large a
    gives 2^t = 0 and q = 2^-n (sigmoid saturated); a far below the others gives 2^t = inf and
    q = 0 (its weight is below the smallest normal fp32); 2^n = 0 (n < -126) gives q = 2^-t, the
    softmax limit; a NaN logit stays NaN. n is a stop-gradient node like softmax's max (the ratio
    does not depend on it).
    """
    if "_nb" not in {sym.name for sym, _ in p.assigns}:
        n = p.node("_nb", sp.floor(sp.Min(mx, 0) * LOG2E), stop_gradient=True)
        p.node("_eb", pow2(n), stop_gradient=True)
    n, eb = real("_nb"), real("_eb")
    q = real(f"_q{c}")
    # dq/da written with q itself (sigmoid' = sigmoid (1 - sigmoid), scaled): q (1 - q 2^n).
    # A test checks it against sympy.diff.
    return p.node(f"_q{c}", recip(exp2(n - a * LOG2E) + eb), partials={a: q * (1 - q * eb)})


@lru_cache(maxsize=None)
def update_blocks(k: int, normalization: str) -> tuple[CodeBlock, CodeBlock]:
    """(forward, adjoint) blocks of the per-pixel update (contract: gspngen/lower)."""
    p, h, v = update_program(k, normalization)
    forward = finish_block(v.names, [("h", h)], p)
    gh = real("gh")
    wrt = [v.lam, v.x, *v.w, *v.hp]
    adj, grads = reverse_mode(p, {h: gh}, wrt)
    outputs = [("glam", grads[v.lam]), ("gx", grads[v.x])]
    outputs += [(f"gw{c}", grads[v.w[c]]) for c in range(k)]
    outputs += [(f"ghp{c}", grads[v.hp[c]]) for c in range(k)]
    adjoint = finish_block(["gh"] + v.names, outputs, p, adj)
    return forward, adjoint


def merge_factor(merge: str, num_directions: int) -> sp.Expr:
    """f in y_d = f*(...): 1 for sum/stack, 1/D for mean, the symbol md for learned."""
    if merge == "learned":
        return real("md")
    if merge == "mean":
        return sp.Rational(1, num_directions)
    return sp.Integer(1)


@lru_cache(maxsize=None)
def output_blocks(modulation: bool, skip: bool, merge: str, num_directions: int) -> tuple[CodeBlock, CodeBlock]:
    """(output, adjoint_output) blocks: y_d = f*(u*h or h) + f*s*x and its gradients."""
    h, x, u, s, md, gy = (real(n) for n in ("h", "x", "u", "s", "md", "gy"))
    f = merge_factor(merge, num_directions)
    p = Program()
    y = p.node("_y", f * (u * h if modulation else h) + (f * s * x if skip else 0))
    used = {"u": modulation, "s": skip, "md": merge == "learned"}
    extra = [sym for sym in (u, s, md) if used[sym.name]]
    adj, grads = reverse_mode(p, {y: gy}, [h, x, *extra])
    names = ["h", "x"] + [sym.name for sym in extra]
    output = finish_block(names, [("y", y)], p)
    outs = [("gh", grads[h]), ("gx", grads[x])] + [("g" + sym.name, grads[sym]) for sym in extra]
    adjoint_output = finish_block(["gy"] + names, outs, p, adj)
    return output, adjoint_output
