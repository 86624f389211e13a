"""The lowering: derived gradients vs autograd, border safety, O(k) adjoint, block interface,
index maps vs real tensor strides, and the printers (torch executed; Triton run in the interpreter)."""

from __future__ import annotations

import importlib.util
import itertools
import os
import re

import numpy as np
import pytest
import sympy as sp
import torch

from gspngen import Spec
from gspngen.backends.lowered import compile_block
from gspngen.backends.reference import normalize_weights
from gspngen.geometry import neighbour_exists, to_channel_first, to_frame
from gspngen.lower import C, H, N, W, lower, print_block
from gspngen.lower.derive import exp2, output_blocks, pow2, recip, sigmoid, update_blocks
from gspngen.testing import rel_error

KS = (1, 3, 5, 7, 9)
NORMS = ("stability", "softmax", "none")
MERGES = ("sum", "mean", "learned", "stack")


# -- derived gradients against torch autograd of the reference update ---------------------------

def random_line(k: int, L: int, rows: int, seed: int, logit_scale: float = 2.0):
    """Block inputs for `rows` x L pixels (every lane of a line: borders and inside)."""
    gen = torch.Generator().manual_seed(seed)
    exists = neighbour_exists(L, k)  # (k, L)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    w = rnd(rows, k, L) * logit_scale
    hp = rnd(rows, k, L) * exists  # the template supplies 0 where a neighbour does not exist
    return dict(w=w, hp=hp, lam=rnd(rows, L), x=rnd(rows, L), gh=rnd(rows, L), exists=exists)


def block_args(v, k):
    args = {f"w{c}": v["w"][:, c] for c in range(k)}
    args.update({f"e{c}": v["exists"][c] for c in range(k)})
    args.update({f"hp{c}": v["hp"][:, c] for c in range(k)})
    args.update(lam=v["lam"], x=v["x"])
    return args


def reference_update(v, norm):
    """h = lam*x + sum_c wn_c*hp_c with the reference backend's normalisation."""
    w = v["w"].clone().requires_grad_(True)
    hp = v["hp"].clone().requires_grad_(True)
    lam = v["lam"].clone().requires_grad_(True)
    x = v["x"].clone().requires_grad_(True)
    wn = normalize_weights(w[:, :, None, :, None], norm, v["exists"])[:, :, 0, :, 0]
    h = lam * x + (wn * hp).sum(dim=1)
    grads = torch.autograd.grad(h, (w, hp, lam, x), v["gh"])
    return h.detach(), dict(zip(("w", "hp", "lam", "x"), grads))


def run_blocks(v, k, norm):
    fwd, adj = (compile_block(b) for b in update_blocks(k, norm))
    args = block_args(v, k)
    h = fwd(**args)["h"]
    g = adj(gh=v["gh"], **args)
    like = v["x"]
    full = {n: torch.broadcast_to(torch.as_tensor(t, dtype=like.dtype), like.shape) for n, t in g.items()}
    return torch.broadcast_to(h, like.shape), full


def close(a, b, tol=1e-12):
    """Relative to the largest magnitude, with an absolute floor for all-but-zero gradients."""
    scale = max(b.abs().max().item(), 1.0)
    return (a - b).abs().max().item() <= tol * scale


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("k", KS)
def test_derived_gradients_equal_autograd(k, norm):
    r = (k - 1) // 2
    # L = 2r+3 has border lanes on both sides and at least one lane with every neighbour;
    # L = 1 leaves only the centre.
    for L, seed in ((2 * r + 3, k), (1, 100 + k)):
        v = random_line(k, L, rows=6, seed=seed)
        h_ref, g_ref = reference_update(v, norm)
        h, g = run_blocks(v, k, norm)
        assert close(h, h_ref), (L, "h")
        assert close(g["glam"], g_ref["lam"]) and close(g["gx"], g_ref["x"]), L
        for c in range(k):
            assert close(g[f"gw{c}"], g_ref["w"][:, c]), (L, f"gw{c}")
            # ghp_c is the gradient for the neighbour value; it only matters where it exists
            assert close(g[f"ghp{c}"] * v["exists"][c], g_ref["hp"][:, c]), (L, f"ghp{c}")
        if L > 1 and k > 1:
            assert not bool(v["exists"].all()) and bool(v["exists"].all(dim=0).any())  # borders and inside


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("k", (3, 9))
def test_garbage_logits_of_missing_neighbours_are_inert(k, norm):
    L = k + 2
    clean = random_line(k, L, rows=3, seed=7)
    missing = ~clean["exists"]
    dirty = dict(clean)
    w = clean["w"].clone()
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=w.dtype)
    idx = missing.nonzero()
    for j, (c, i) in enumerate(idx.tolist()):
        w[:, c, i] = garbage[j % 3]
    dirty["w"] = w
    h0, g0 = run_blocks(clean, k, norm)
    h1, g1 = run_blocks(dirty, k, norm)
    assert torch.isfinite(h1).all() and torch.equal(h0, h1)
    for name in g0:
        assert torch.isfinite(g1[name]).all(), name
        assert torch.equal(g0[name], g1[name]), name  # garbage never reaches arithmetic: bit-identical
    for c, i in idx.tolist():
        assert (g1[f"gw{c}"][:, i] == 0).all()


def test_softmax_is_stable_for_huge_logits():
    k, L = 5, 7
    v = random_line(k, L, rows=2, seed=3, logit_scale=1.0)
    v["w"] = v["w"] + 800.0  # exp overflows without the max shift, even in float64
    h, g = run_blocks(v, k, "softmax")
    assert torch.isfinite(h).all() and all(torch.isfinite(t).all() for t in g.values())
    v["w"] = v["w"] - 1600.0  # ... and underflows to Z = 0 without it
    h, g = run_blocks(v, k, "softmax")
    assert torch.isfinite(h).all() and all(torch.isfinite(t).all() for t in g.values())


def test_mass_is_conserved_by_the_forward_block():
    for norm in ("stability", "softmax"):
        k, L = 7, 9
        v = random_line(k, L, rows=4, seed=11, logit_scale=5.0)
        v["hp"] = v["exists"].to(torch.float64).expand(4, k, L).clone()  # previous line all ones
        v["lam"] = torch.ones(4, L, dtype=torch.float64)
        v["x"] = torch.zeros(4, L, dtype=torch.float64)
        h, _ = run_blocks(v, k, norm)
        assert torch.allclose(h, torch.ones_like(h), atol=1e-14, rtol=0)


# -- cost: each non-linearity once, and an O(k) adjoint ---------------------------------------

def count_calls(block, fn) -> int:
    return sum(1 for _, rhs in block.assigns for node in sp.preorder_traversal(rhs) if isinstance(node, fn))


@pytest.mark.parametrize("norm", ("stability", "softmax"))
def test_each_nonlinearity_is_computed_once(norm):
    for k in KS:
        fwd, adj = update_blocks(k, norm)
        # one (base-2) exponential per neighbour and nothing else: stability's per-pixel scale 2^n
        # is a power of two (pow2, built from exponent bits), never a further exponential.
        # k = 1: the only weight normalises to the constant 1.
        want = 0 if k == 1 else k
        assert count_calls(fwd, exp2) == want and count_calls(adj, exp2) == want, k
        assert count_calls(fwd, sp.exp) == 0 and count_calls(adj, sp.exp) == 0, k
        scale = 1 if k > 1 and norm == "stability" else 0
        assert count_calls(fwd, pow2) == scale and count_calls(adj, pow2) == scale, k
        assert count_calls(fwd, sigmoid) == 0 and count_calls(adj, sigmoid) == 0
        # divisions: one reciprocal of the weight sum, plus stability's one per neighbour; no other
        want = 0 if k == 1 else (k + 1 if norm == "stability" else 1)
        assert count_calls(fwd, recip) == want and count_calls(adj, recip) == want, k
        for blk in (fwd, adj):
            pows = [n for _, rhs in blk.assigns for n in sp.preorder_traversal(rhs) if isinstance(n, sp.Pow)]
            assert all(n.exp > 0 for n in pows), (k, pows)  # no 1/x left for a printer's IEEE divide


def test_given_partials_equal_sympy_diff():
    # the stability weight's derivative is written with the value itself; it must be sympy.diff's,
    # at consistent values of the stop-gradient nodes it reads (b = min(max logit, 0), exp(b))
    from gspngen.lower.derive import update_program

    k = 5
    p, _, v = update_program(k, "stability")
    checked = 0
    for logits in ([-200.0, -150.0, -400.0, -180.0, -1000.0], [-1.5, 0.7, 12.0, 79.0, 85.0],
                   [0.0, -30.0, -3.0, -0.5, -2.0]):
        env = {**{w: sp.Float(x) for w, x in zip(v.w, logits)}, **{e: sp.true for e in v.e}}
        for sym, rhs in p.assigns:
            for arg, given in p.partials.get(sym, {}).items():
                at = {s: env[s] for s in rhs.free_symbols}
                want = sp.diff(rhs, arg).xreplace(at)
                got = given.xreplace({sym: rhs}).xreplace(at)
                w, g = float(want.evalf(30)), float(got.evalf(30))
                assert abs(w - g) <= 1e-12 * max(1.0, abs(w)), (sym, logits, w, g)
                checked += 1
            env[sym] = rhs.xreplace(env)
    assert checked == 3 * k


@pytest.mark.parametrize("norm", NORMS)
def test_adjoint_cost_grows_linearly_in_k(norm):
    ops = [update_blocks(k, norm)[1].count_ops() for k in KS]
    steps = np.diff(ops[1:])  # k = 3 -> 5 -> 7 -> 9 (k = 1 is degenerate: its weight is constant)
    # O(k^2) (differentiating each normalised weight separately) would make these steps grow.
    assert steps.max() - steps.min() <= 2, ops
    assert ops[-1] <= 25 * KS[-1], ops  # a small constant per neighbour


# -- the block interface renderers rely on ------------------------------------------------------

def check_ssa(block, inputs, outputs):
    assert block.inputs == tuple(inputs)
    assert block.outputs == tuple(outputs)
    defined = set(inputs)
    names = [s.name for s, _ in block.assigns]
    assert len(names) == len(set(names)), "each symbol is assigned once"
    for sym, rhs in block.assigns:
        used = {s.name for s in rhs.free_symbols}
        assert used <= defined, (sym, used - defined)
        assert sym.name in outputs or re.fullmatch(r"cse\d+", sym.name), sym
        defined.add(sym.name)
    assert set(outputs) <= set(names)


@pytest.mark.parametrize("norm", NORMS)
def test_update_block_interface(norm):
    for k in KS:
        fwd, adj = update_blocks(k, norm)
        ins = [f"w{c}" for c in range(k)] + [f"e{c}" for c in range(k)] + [f"hp{c}" for c in range(k)] + ["lam", "x"]
        check_ssa(fwd, ins, ["h"])
        outs = ["glam", "gx"] + [f"gw{c}" for c in range(k)] + [f"ghp{c}" for c in range(k)]
        check_ssa(adj, ["gh"] + ins, outs)


def test_output_block_interface():
    for mod, skip, merge in itertools.product((False, True), (False, True), MERGES):
        out, adj = output_blocks(mod, skip, merge, 3)
        ins = ["h", "x"] + (["u"] if mod else []) + (["s"] if skip else []) + (["md"] if merge == "learned" else [])
        check_ssa(out, ins, ["y"])
        outs = ["gh", "gx"] + ["g" + n for n in ins[2:]]
        check_ssa(adj, ["gy"] + ins, outs)
        if not skip:
            assert adj.expr("gx") == 0


def test_output_blocks_match_autograd():
    gen = torch.Generator().manual_seed(5)
    vals = {n: torch.randn(8, generator=gen, dtype=torch.float64) for n in ("h", "x", "u", "s", "gy")}
    vals["md"] = torch.tensor(0.7, dtype=torch.float64)
    for mod, skip, merge in itertools.product((False, True), (False, True), MERGES):
        out, adj = output_blocks(mod, skip, merge, 3)
        leaves = {n: vals[n].clone().requires_grad_(True) for n in out.inputs}
        f = {"learned": leaves.get("md"), "mean": 1 / 3}.get(merge, 1.0)
        y_ref = f * (leaves["u"] * leaves["h"] if mod else leaves["h"]) + (f * leaves["s"] * leaves["x"] if skip else 0)
        grads = torch.autograd.grad(y_ref, list(leaves.values()), vals["gy"], allow_unused=True)
        y = compile_block(out)(**{n: vals[n] for n in out.inputs})["y"]
        assert close(y, y_ref.detach())
        g = compile_block(adj)(gy=vals["gy"], **{n: vals[n] for n in out.inputs})
        for name, gr in zip(leaves, grads):
            expect = torch.zeros(8, dtype=torch.float64) if gr is None else gr
            got = g["gmd" if name == "md" else "g" + name]
            if name == "md":
                got = got.sum()  # a pixel's share; the template reduces over pixels
            assert close(torch.as_tensor(got, dtype=torch.float64).expand_as(expect), expect), (mod, skip, merge, name)


def raw_logits_outside_selects(expr, k):
    """Raw logits w_c (c != r) that occur anywhere but as the value of select(e_c, w_c, .)."""
    r = (k - 1) // 2
    bad = set()

    def walk(e):
        if isinstance(e, sp.Piecewise):
            (value, flag), (other, _) = e.args
            if isinstance(value, sp.Symbol) and value.name == f"w{str(flag)[1:]}":
                walk(other)
                return
        if isinstance(e, sp.Symbol) and re.fullmatch(r"w\d+", e.name) and e.name != f"w{r}":
            bad.add(e.name)
        for a in e.args:
            walk(a)

    walk(expr)
    return bad


@pytest.mark.parametrize("norm", NORMS)
def test_raw_logits_are_selected_before_any_arithmetic(norm):
    for k in KS:
        for block in update_blocks(k, norm):
            for sym, rhs in block.assigns:
                assert not raw_logits_outside_selects(rhs, k), (k, sym, rhs)


def test_lower_fields_and_cache():
    spec = Spec.from_dict({"name": "a", "connection": 5, "directions": ["bt", "lr"], "chunk": 4,
                           "merge": "mean", "layout": "nhwc", "normalization": "softmax"})
    ir = lower(spec)
    assert lower(spec) is ir
    assert (ir.k, ir.r, ir.chunk, ir.merge, ir.layout, ir.precision) == (5, 2, 4, "mean", "nhwc", spec.precision)
    assert [(d.name, d.index, d.step_axis, d.lane_axis, d.reverse) for d in ir.directions] == [
        ("bt", 0, "H", "W", True), ("lr", 1, "W", "H", False)]
    assert ir.forward is update_blocks(5, "softmax")[0]
    assert "0.5" in print_block(ir.output, "torch")[-1]  # mean over D = 2 printed as a number
    with pytest.raises(TypeError, match="spec"):
        lower({"name": "a"})


# -- index maps against the strides of real tensors --------------------------------------------

@pytest.mark.parametrize("layout", ("nchw", "nhwc"))
@pytest.mark.parametrize("direction", ("lr", "rl", "tb", "bt"))
def test_index_maps_match_tensor_memory(layout, direction):
    spec = Spec.from_dict({"name": "m", "directions": [direction], "layout": layout})
    d = lower(spec).directions[0]
    sizes = {N: 2, C: 3, H: 4, W: 5}
    shape = (2, 4, 5, 3) if layout == "nhwc" else (2, 3, 4, 5)
    mem = torch.arange(int(np.prod(shape))).reshape(shape)  # element value = its offset in memory
    frame = to_frame(to_channel_first(mem, layout), direction)  # (N, C, L, T) in step order
    n, ch, i, t = np.meshgrid(*[np.arange(s) for s in frame.shape], indexing="ij")
    ns, chs, ts, is_ = sp.symbols("n ch t i")
    offset = sp.lambdify((ns, chs, ts, is_), d.offset(ns, chs, ts, is_).subs(sizes), "numpy")
    assert np.array_equal(offset(n, ch, t, i), frame.numpy())
    # strides: offset = batch*n + base + t*stride_step + i*stride_lane + ch*stride_channel
    ss, sl, sc, base = (int(e.subs(sizes)) for e in d.strides())
    L, T = (int(e.subs(sizes)) for e in d.extents())
    assert frame.shape[-2:] == (L, T)
    assert frame[0, 0, 0, 0].item() == base
    if T > 1:
        assert (frame[..., 1:] - frame[..., :-1] == ss).all()
    assert (frame[:, :, 1:] - frame[:, :, :-1] == sl).all() and (frame[:, 1:] - frame[:, :-1] == sc).all()
    assert (ss < 0) == d.reverse and int(d.batch_stride().subs(sizes)) == int(np.prod(shape[1:]))
    # C is the channel count of the tensor at hand: weights pass G
    step_ch = (d.offset(0, 1, 0, 0, C=7) - d.offset(0, 0, 0, 0, C=7)).subs(sizes)
    assert step_ch == (1 if layout == "nhwc" else 20)
    assert d.offset(1, 0, 0, 0, C=7) - d.offset(0, 0, 0, 0, C=7) == 7 * H * W


# -- printers --------------------------------------------------------------------------------

def all_blocks():
    for k, norm in itertools.product(KS, NORMS):
        yield from update_blocks(k, norm)
    for mod, skip, merge in itertools.product((False, True), (False, True), MERGES):
        yield from output_blocks(mod, skip, merge, 4)


def test_cuda_printer_emits_fp32_c():
    for block in all_blocks():
        lines = print_block(block, "cuda")
        assert len(lines) == len(block.assigns)
        for line, (sym, _) in zip(lines, block.assigns):
            assert re.fullmatch(rf"const float {sym.name} = .+;", line), line
            assert not re.search(r"(?<![\w.])(exp|pow|powf|fmax|sqrt)\(", line), line  # fp32 libm only
            assert not re.search(r"\d\.\d*F\b|\b\d+\.\d+(?![\df])", line), line  # literals are 1.0f
            assert "Piecewise" not in line and "Max(" not in line
    text = "\n".join(print_block(update_blocks(3, "stability")[1], "cuda"))
    assert "exp2f(fmaf(" in text and "(e0 ? " in text and "fmaf(" in text and "1.0f" in text
    # divisions only as the fast reciprocal (no IEEE divide, no accurate expf with its range reduction)
    assert "__fdividef(1.0f, " in text and "/" not in text and "expf(" not in text


def test_python_printers():
    for block in all_blocks():
        tri, tor = print_block(block, "triton"), print_block(block, "torch")
        for line in tri:
            assert "torch." not in line and "math." not in line and "Piecewise" not in line
        for line in tor:
            assert "tl." not in line and "math." not in line and "Piecewise" not in line
        compile("\n".join(tri + tor), "<printed>", "exec")  # valid Python
    soft = "\n".join(print_block(update_blocks(5, "softmax")[1], "triton"))
    assert "tl.where(e0, " in soft and "tl.exp2(" in soft and "tl.maximum(" in soft
    with pytest.raises(ValueError, match="lang"):
        print_block(update_blocks(3, "none")[0], "fortran")


HAS_TRITON = importlib.util.find_spec("triton") is not None

TRITON_HARNESS = '''
import triton
import triton.language as tl


@triton.jit
def harness(inp, outp, P: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < P
{loads}
{body}
{stores}
'''


@pytest.mark.skipif(not HAS_TRITON and not os.environ.get("CI"), reason="triton not installed")
@pytest.mark.parametrize("norm", NORMS)
def test_triton_printer_runs_in_interpreter(norm, tmp_path, monkeypatch):
    """The printed Triton lines run inside a jit kernel (interpreter on CPU) and match the torch lines."""
    k = 5
    _, adj = update_blocks(k, norm)
    v = random_line(k, L=7, rows=1, seed=21)
    args = block_args(v, k)
    args["gh"] = v["gh"]
    P = 7
    inputs = [torch.broadcast_to(torch.as_tensor(args[n]), (1, P)).reshape(P).to(torch.float32) for n in adj.inputs]
    loads = "\n".join(
        f"    {n} = tl.load(inp + {j} * P + offs, mask=mask, other=0.0)" + (" != 0.0" if n.startswith("e") else "")
        for j, n in enumerate(adj.inputs))
    body = "\n".join("    " + line for line in print_block(adj, "triton"))
    stores = "\n".join(f"    tl.store(outp + {j} * P + offs, {n}, mask=mask)" for j, n in enumerate(adj.outputs))
    path = tmp_path / f"harness_{norm}.py"
    path.write_text(TRITON_HARNESS.format(loads=loads, body=body, stores=stores))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    inp = torch.stack(inputs).contiguous()
    out = torch.full((len(adj.outputs), P), float("nan"), dtype=torch.float32)
    module.harness[(1,)](inp, out, P=P, BLOCK=8)
    expect = compile_block(adj)(**{n: (t != 0 if n.startswith("e") else t) for n, t in zip(adj.inputs, inputs)})
    for j, name in enumerate(adj.outputs):
        want = torch.broadcast_to(torch.as_tensor(expect[name], dtype=torch.float32), (P,))
        assert rel_error(out[j], want) <= 1e-5 or (want.abs().max() < 1e-6 and out[j].abs().max() < 1e-6), name


PRINT_ALL = """
import itertools
from gspngen.lower import print_block
from gspngen.lower.derive import output_blocks, update_blocks
blocks = [b for k, n in itertools.product((3, 5), ("stability", "softmax", "none")) for b in update_blocks(k, n)]
blocks += [b for g in ("mean", "learned") for b in output_blocks(True, True, g, 4)]
print("\\n".join(line for b in blocks for lang in ("cuda", "triton", "torch") for line in print_block(b, lang)))
"""


def test_printed_code_is_deterministic_across_processes():
    """Generated sources must be byte-identical run to run (hash seeds vary set orders)."""
    import subprocess
    import sys

    here = {}
    exec(compile(PRINT_ALL.replace("print(", "out = ("), "<print_all>", "exec"), here)
    r = subprocess.run([sys.executable, "-c", PRINT_ALL], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == here["out"] + "\n"
