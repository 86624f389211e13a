"""The reference backend: DESIGN §4 in plain PyTorch, the oracle for every other backend.

Written for clarity first: each direction is mapped to a frame (lanes x steps),
the weights are normalised over the neighbours that exist, and a Python loop
walks the steps, vectorised over batch, channels and lanes. The k neighbours of
every lane come from one ``unfold`` of the zero-padded previous line, so a step
is a handful of tensor ops whatever k is. Any floating dtype; 16-bit inputs are
computed in fp32. The backward is torch autograd through the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..geometry import chunk_starts, from_channel_first, from_frame, neighbour_exists, to_channel_first, to_frame
from ..spec import Spec
from .base import Untuned, compute_dtype


def normalize_weights(wf: torch.Tensor, normalization: str, exists: torch.Tensor) -> torch.Tensor:
    """Normalise logits over the neighbours that exist.

    wf: (N, k, G, L, T) logits in a frame; exists: (k, L) bool.
    Non-existing neighbours get weight 0 and gradient 0, whatever their logit
    holds (even inf/NaN): values are masked *before* any non-linearity.
    """
    mask = exists[None, :, None, :, None]
    if normalization == "none":
        return torch.where(mask, wf, torch.zeros((), dtype=wf.dtype, device=wf.device))
    if normalization == "softmax":
        masked = torch.where(mask, wf, torch.full((), float("-inf"), dtype=wf.dtype, device=wf.device))
        return torch.softmax(masked, dim=1)  # stable (max-subtracted); the centre always exists
    # stability: sigmoid(w_c) / sum sigmoid(w_c') = softmax of log sigmoid(w), which torch computes
    # stably: exact for every finite logit, where the plain ratio underflows to 0/0 below about
    # -88 (fp32). Limits: +inf -> sigmoid 1; -inf -> weight 0; every existing logit -inf -> NaN.
    safe = torch.where(mask, wf, torch.zeros((), dtype=wf.dtype, device=wf.device))
    logs = torch.where(mask, F.logsigmoid(safe), torch.full((), float("-inf"), dtype=wf.dtype, device=wf.device))
    return torch.softmax(logs, dim=1)


def scan_direction(spec: Spec, direction: str, x: torch.Tensor, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Hidden state h of one direction, channel-first (N, C, H, W).

    x, lam: (N, C, H, W); w: (N, k, G, H, W) — all channel-first, compute dtype.
    """
    N, C = x.shape[:2]
    k, r = spec.connection, spec.radius
    G = w.shape[2]
    xf, lf, wf = to_frame(x, direction), to_frame(lam, direction), to_frame(w, direction)
    L, T = xf.shape[-2:]
    wn = normalize_weights(wf, spec.normalization, neighbour_exists(L, k, x.device))
    wn = wn.permute(0, 2, 1, 3, 4).unsqueeze(2)  # (N, G, 1, k, L, T): broadcast over channels of a group
    drive = (lf * xf).view(N, G, C // G, L, T)  # lam * x for every pixel at once
    # Step-major copies, unbound once: each step then reads contiguous memory,
    # and autograd does not build a full-size gradient per indexed step.
    drive_t = drive.movedim(-1, 0).contiguous().unbind(0)
    wn_t = wn.movedim(-1, 0).contiguous().unbind(0)
    starts = chunk_starts(T, spec.chunk)
    lines: list[torch.Tensor] = []
    h = None
    for t in range(T):
        if starts[t]:
            h = drive_t[t]
        else:
            # neighbours[..., c, i] = h_prev[i + c - r], zero where it does not exist
            neighbours = F.pad(h, (r, r)).unfold(-1, L, 1)  # (N, G, Cg, k, L)
            h = drive_t[t] + (neighbours * wn_t[t]).sum(dim=-2)
        lines.append(h)
    hf = torch.stack(lines, dim=-1).view(N, C, L, T)
    return from_frame(hf, direction)


def forward(spec: Spec, x, w, lam, u=None, s=None, m=None) -> torch.Tensor:
    """The full op: every direction, modulation, skip and merge (DESIGN §4)."""
    out_dtype = x.dtype
    cd = compute_dtype(x.dtype)
    lay = spec.layout
    x_c = to_channel_first(x, lay).to(cd)
    ys = []
    for d, direction in enumerate(spec.directions):
        w_d = to_channel_first(w[:, d], lay).to(cd)  # (N, k, G, H, W)
        lam_d = to_channel_first(lam[:, d], lay).to(cd)
        y = scan_direction(spec, direction, x_c, w_d, lam_d)
        if spec.modulation:
            y = to_channel_first(u[:, d], lay).to(cd) * y
        if spec.skip:
            y = y + to_channel_first(s[:, d], lay).to(cd) * x_c
        ys.append(y)
    if spec.merge == "stack":
        out = torch.stack([from_channel_first(y, lay) for y in ys], dim=1)
    else:
        if spec.merge == "learned":
            mc = m.to(cd)
            total = sum(mc[d] * y for d, y in enumerate(ys))
        else:
            total = sum(ys)
            if spec.merge == "mean":
                total = total / len(ys)
        out = from_channel_first(total, lay)
    return out.to(out_dtype)


class ReferenceBackend(Untuned):
    name = "reference"

    def available(self, device: torch.device) -> bool:
        return True

    def saved_shape(self, spec, x):
        return (0,), x.dtype

    skips_saved = True  # forward(..., need_saved=False) is understood (nothing is saved anyway)

    def forward(self, spec, x, w, lam, u, s, m, need_saved: bool = True):
        return forward(spec, x, w, lam, u, s, m), x.new_empty(0)

    def backward(self, spec, gy, x, w, lam, u, s, m, saved):
        # Inside a custom op the autograd keys are excluded; torch.func.vjp
        # differentiates regardless, so the oracle's gradient is autograd's.
        present = [t for t in (x, w, lam, u, s, m) if t is not None]

        def f(*ts):
            it = iter(ts)
            return forward(spec, *[next(it) if t is not None else None for t in (x, w, lam, u, s, m)])

        _, vjp = torch.func.vjp(f, *present)
        grads = iter(vjp(gy))
        return tuple(next(grads) if t is not None else None for t in (x, w, lam, u, s, m))
