"""``gspngen check``: does a spec work on this machine? A pass/fail table.

Four kinds of row:

- stability: mass conservation (DESIGN §4), run through every backend
  checked. With lam = 1 and an input that is 1 on one whole line at step t0,
  h is 1 at every later step of the chunk and exactly 0 elsewhere, however
  large the logits. The other directions are silenced with lam = 0 and s = 0
  (their h is then exactly 0), u = 1 and m = 1, so the op's output is h of one
  direction (times 1/D for ``mean``). n/a for ``normalization: none``.
- connectivity: with four directions, k >= 3 and a global scan every output
  pixel depends on every input pixel. One backward pass finds all output
  pixels at once: the reference runs on H*W copies of one input and copy n
  back-propagates from output pixel n only.
- forward / grad x, w, lam, u, s, m: every backend available here against the
  float64 reference on the same (rounded) inputs, relative to the largest
  magnitude (gspngen.testing.tolerance). Logits of neighbours that do not
  exist are NaN (they must be ignored) and fresh allocations are NaN-filled
  (torch's deterministic mode), so unwritten elements show.
- gradcheck: torch.autograd.gradcheck (fast mode) of the reference in float64 on a tiny shape.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from .analysis import mark_pixel_
from .api import KERNEL_BACKENDS, GSPNOp
from .backends import BACKEND_NAMES, get_backend
from .geometry import chunk_starts, frame_extent, from_channel_first, from_frame, neighbour_exists, \
    to_channel_first, to_frame
from .spec import Spec
from .testing import ARG_NAMES, make_inputs, rel_error, tolerance

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STABILITY_LOGIT_SCALE = 30.0  # large logits: sigmoid/exp saturate, normalisation must still hold
CONNECTIVITY_MAX_SIDE = 8  # the property is structural; larger images only cost time


@dataclass(frozen=True)
class Row:
    check: str
    backend: str
    status: str  # PASS | FAIL | n/a | skipped
    error: Optional[float] = None
    tol: Optional[float] = None
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


def small_channels(spec: Spec, want: int = 4) -> int:
    """The smallest channel count >= want that the spec's weight groups divide."""
    g = spec.weight_groups
    if isinstance(g, int):
        return g * -(-want // g)
    return want


MAX_DEFAULT_SIDE = 64  # keeps the default check of a long-chunk spec within seconds


def default_shape(spec: Spec) -> tuple[int, int, int, int]:
    """Non-square and not a multiple of common chunk sizes, so transposition and chunk-boundary
    bugs show; with a chunk K, both sides exceed K (up to MAX_DEFAULT_SIDE) so every direction
    crosses at least one chunk boundary."""
    H, W = 9, 10
    K = spec.chunk
    if K is not None and K + 3 > H:
        H = min(K + 3, MAX_DEFAULT_SIDE - 1)
        W = H + 1
    return (2, small_channels(spec), H, W)


def chunk_note(spec: Spec, shape) -> Optional[str]:
    """A warning when no scan of this shape crosses a chunk boundary (chunk-restart code is then untested)."""
    K = spec.chunk
    if K is None:
        return None
    _, _, H, W = shape
    if K < min(H, W):
        return None
    return (f"note: chunk {K} >= the shortest side {min(H, W)}: some scans cross no chunk boundary here; "
            f"pass --shape with H and W above {K} to test chunk restarts")


@contextlib.contextmanager
def nan_filled_allocations() -> Iterator[None]:
    """Make torch.empty & co. return NaN-filled memory (torch's deterministic mode), then restore."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "no deterministic implementation" notes
            yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_fill
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn)


def poison_missing_neighbours(spec: Spec, w: torch.Tensor) -> torch.Tensor:
    """A copy of w whose logits for neighbours that do not exist are NaN (backends must ignore them)."""
    out = []
    H, W = (w.shape[3], w.shape[4]) if spec.layout == "nhwc" else (w.shape[4], w.shape[5])
    for d, name in enumerate(spec.directions):
        L, T = frame_extent(name, H, W)
        exists = neighbour_exists(L, spec.connection, w.device)[:, :, None].expand(-1, -1, T)
        mask = from_frame(exists, name)  # (k, H, W)
        wd = to_channel_first(w[:, d], spec.layout)  # (N, k, G, H, W)
        wd = torch.where(mask[None, :, None], wd, torch.full((), float("nan"), dtype=w.dtype, device=w.device))
        out.append(from_channel_first(wd, spec.layout))
    return torch.stack(out, dim=1)


# -- (a) stability ------------------------------------------------------------

def _line_input(spec: Spec, name: str, shape, t0: int, dtype, device) -> torch.Tensor:
    """x that is 1 on the whole line at step t0 of direction ``name`` and 0 elsewhere."""
    N, C, H, W = shape
    L, T = frame_extent(name, H, W)
    xf = torch.zeros(N, C, L, T, dtype=dtype, device=device)
    xf[..., t0] = 1
    return from_channel_first(from_frame(xf, name).contiguous(), spec.layout).contiguous()


def check_stability(spec: Spec, backend: str, shape, dtype, device, seed: int) -> Row:
    if spec.normalization == "none":
        return Row("stability", backend, "n/a", note="normalization: none has no mass conservation")
    N, C, H, W = shape
    op = GSPNOp(spec, backend)
    base = make_inputs(spec, N, C, H, W, dtype=torch.float64, seed=seed, logit_scale=STABILITY_LOGIT_SCALE)
    worst, exact_zero = 0.0, True
    for d, name in enumerate(spec.directions):
        L, T = frame_extent(name, H, W)
        starts = chunk_starts(T, spec.chunk)
        span = min(spec.chunk or T, T)
        t0 = span // 2
        end = next((t for t in range(t0 + 1, T) if starts[t]), T)
        inp = {k: (None if v is None else v.to(dtype=dtype, device=device)) for k, v in base.items()}
        inp["w"] = poison_missing_neighbours(spec, inp["w"])
        inp["x"] = _line_input(spec, name, shape, t0, dtype, device)
        lam = torch.zeros_like(inp["lam"])
        lam[:, d] = 1  # only direction d propagates
        inp["lam"] = lam
        if inp["u"] is not None:
            inp["u"] = torch.ones_like(inp["u"])
        if inp["s"] is not None:
            inp["s"] = torch.zeros_like(inp["s"])
        if inp["m"] is not None:
            inp["m"] = torch.ones_like(inp["m"])
        with nan_filled_allocations(), torch.no_grad():
            y = op(**inp)
        y = y[:, d] if spec.merge == "stack" else y
        h = to_frame(to_channel_first(y, spec.layout), name).double()  # (N, C, L, T)
        if spec.merge == "mean":
            h = h * spec.num_directions
        inside = h[..., t0:end]
        outside = torch.cat([h[..., :t0], h[..., end:]], dim=-1)
        if torch.isnan(h).any():
            worst = float("inf")
            continue
        worst = max(worst, (inside - 1).abs().max().item())
        if outside.numel():
            exact_zero &= bool((outside == 0).all())
            worst = max(worst, outside.abs().max().item())
    tol = tolerance(dtype)
    ok = worst <= tol and exact_zero
    note = "h = 1 after the line, exactly 0 elsewhere" if ok else (
        "h is not 1 after the line" if exact_zero else "h is not exactly 0 outside the line's chunk")
    return Row("stability", backend, "PASS" if ok else "FAIL", worst, tol, note)


# -- (b) connectivity ---------------------------------------------------------

def check_connectivity(spec: Spec, shape, seed: int) -> Row:
    why = None
    if set(spec.directions) != {"lr", "rl", "tb", "bt"}:
        why = "needs all four directions"
    elif spec.chunk is not None:
        why = "local (chunked) scan"
    elif spec.connection < 3:
        why = "k = 1 connects along lines only"
    if why:
        return Row("connectivity", "reference", "n/a", note=why)
    _, C, H, W = shape
    H, W = min(H, CONNECTIVITY_MAX_SIDE), min(W, CONNECTIVITY_MAX_SIDE)
    C = small_channels(spec, 2)
    one = make_inputs(spec, 1, C, H, W, dtype=torch.float64, seed=seed)
    P = H * W
    rep = {k: (None if v is None else (v if k == "m" else v.expand(P, *v.shape[1:]).contiguous()))
           for k, v in one.items()}
    x = rep.pop("x").requires_grad_(True)
    y = GSPNOp(spec, "reference")(x, **rep)
    cot = torch.zeros_like(y)
    for n in range(P):
        mark_pixel_(cot, n, divmod(n, W), spec.layout)
    (gx,) = torch.autograd.grad(y, x, cot)
    influence = to_channel_first(gx, spec.layout).abs().sum(dim=1)  # (P, H, W): output pixel x input pixel
    zeros = int((influence == 0).sum())
    ok = zeros == 0
    note = f"all {P}x{P} pixel pairs connected ({H}x{W})" if ok else f"{zeros} of {P * P} pixel pairs unconnected"
    return Row("connectivity", "reference", "PASS" if ok else "FAIL", note=note)


# -- (c) backends against the reference ---------------------------------------

def _present(inp: dict) -> list[str]:
    return [k for k in ARG_NAMES if inp.get(k) is not None]


def _run_with_grads(op: GSPNOp, inp: dict, gy_seed: int):
    names = _present(inp)
    leaves = {k: inp[k].detach().clone().requires_grad_(True) for k in names}
    with nan_filled_allocations():
        y = op(**leaves)
        gen = torch.Generator().manual_seed(gy_seed)
        gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype=y.dtype, device=y.device)
        grads = torch.autograd.grad(y, [leaves[k] for k in names], gy)
    return y, dict(zip(names, grads))


def check_backend(spec: Spec, backend: str, shape, dtype, device, seed: int) -> list[Row]:
    N, C, H, W = shape
    base = make_inputs(spec, N, C, H, W, dtype=torch.float64, seed=seed)
    inp = {k: (None if v is None else v.to(dtype=dtype, device=device)) for k, v in base.items()}
    inp["w"] = poison_missing_neighbours(spec, inp["w"])
    ref_inp = {k: (None if v is None else v.double()) for k, v in inp.items()}  # the same rounded values
    y_ref, g_ref = _run_with_grads(GSPNOp(spec, "reference"), ref_inp, seed + 1)
    y, g = _run_with_grads(GSPNOp(spec, backend), inp, seed + 1)
    tol = tolerance(dtype)
    rows = []
    from .finite import first_nonfinite

    for label, a, b in [("forward", y, y_ref)] + [(f"grad {k}", g[k], g_ref[k]) for k in _present(inp)]:
        err = rel_error(a, b)
        bad = first_nonfinite(a)  # finite inputs: a NaN/inf in a result is a failure whatever the reference says
        note = f"non-finite {bad[1]} at index {bad[0]}" if bad is not None else ""
        ok = err <= tol and bad is None
        rows.append(Row(label, backend, "PASS" if ok else "FAIL", err, tol, note))
    return rows


# -- (d) float64 gradient check of the reference ------------------------------

def check_gradcheck(spec: Spec, seed: int) -> Row:
    C = small_channels(spec, 1)
    inp = make_inputs(spec, 1, C, 3, 4, dtype=torch.float64, seed=seed)
    names = _present(inp)
    op = GSPNOp(spec, "reference")

    def f(*ts):
        return op(**dict(zip(names, ts)))

    leaves = tuple(inp[k].requires_grad_(True) for k in names)
    try:
        # fast mode compares random projections v^T J u: as sensitive to a wrong
        # gradient, and one finite difference per input instead of per element
        torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    except RuntimeError as exc:  # GradcheckError
        first = str(exc).strip().splitlines()[0]
        return Row("gradcheck fp64", "reference", "FAIL", note=first[:80])
    return Row("gradcheck fp64", "reference", "PASS", note=f"shape 1,{C},3,4 (fast mode); atol 1e-7, rtol 1e-5")


# -- driver -------------------------------------------------------------------

def backend_skip_reason(spec: Spec, name: str, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why ``name`` cannot be checked here, or None if it can."""
    if name in KERNEL_BACKENDS and name not in spec.backends:
        return "not in the spec's backends"
    dname = {v: k for k, v in DTYPES.items()}[dtype]
    if name == "cpu":
        from .render.cpu import dtypes as cpu_dtypes

        if dname not in cpu_dtypes(spec):
            return f"{dname} not in the spec's precision (cpu: fp64, fp32 and its 16-bit precisions)"
    elif name in KERNEL_BACKENDS and dname not in spec.precision:
        return f"{dname} not in the spec's precision"
    try:
        backend = get_backend(name)
    except ImportError as exc:
        return f"not installed ({exc.name or exc})"
    try:
        if backend.available(device):
            return None
    except ImportError as exc:
        return f"not installed ({exc.name or exc})"
    if name == "triton" and device.type == "cpu":
        return "needs a GPU (or TRITON_INTERPRET=1 on CPU)"
    reason = getattr(backend, "unavailable_reason", None)
    if reason is not None and reason(device):
        return reason(device)
    return f"cannot run on {device.type} here"


def run_checks(spec: Spec, *, backends: Optional[Sequence[str]] = None, shape=None, dtype=torch.float32,
               device=None, seed: int = 0) -> list[Row]:
    """Every check for a spec; ``backends`` defaults to all registered backends."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = tuple(shape or default_shape(spec))
    G = spec.groups(shape[1])
    if shape[1] % G:
        raise ValueError(f"shape: weight_groups={G} must divide the channel count, got C={shape[1]}")
    rows: list[Row] = []
    runnable = []
    for name in backends or BACKEND_NAMES:
        why = backend_skip_reason(spec, name, dtype, device)
        if why:
            rows.append(Row("backend", name, "skipped", note=why))
        else:
            runnable.append(name)
    for name in runnable:
        rows.extend(_guarded(lambda: [check_stability(spec, name, shape, dtype, device, seed)], "stability", name))
    rows.extend(_guarded(lambda: [check_connectivity(spec, shape, seed)], "connectivity", "reference"))
    for name in runnable:
        rows.extend(_guarded(lambda: check_backend(spec, name, shape, dtype, device, seed), "forward", name))
    rows.extend(_guarded(lambda: [check_gradcheck(spec, seed)], "gradcheck fp64", "reference"))
    return rows


def _guarded(fn, check: str, backend: str):
    """Run a check; an exception is a failed row (a backend that does not support the spec is skipped)."""
    try:
        out = fn()
    except NotImplementedError as exc:
        return [Row(check, backend, "skipped", note=f"unsupported: {_one_line(exc)}")]
    except Exception as exc:  # noqa: BLE001 - a crash is a failure to report, not to propagate
        return [Row(check, backend, "FAIL", note=f"{type(exc).__name__}: {_one_line(exc)}")]
    return out if isinstance(out, list) else [out]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:100]


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2e}"


def format_table(rows: Sequence[Row]) -> str:
    header = ("check", "backend", "result", "worst error", "tolerance", "note")
    body = [(r.check, r.backend, r.status, _fmt(r.error), _fmt(r.tol), r.note) for r in rows]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header) - 1)]
    lines = []
    for line in [header, *body]:
        cells = [str(c).ljust(wd) for c, wd in zip(line, widths)] + [line[-1]]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * wd for wd in widths) + "  ----")
    return "\n".join(lines)
