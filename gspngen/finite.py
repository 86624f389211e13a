"""Finite-check mode: find where a NaN or inf first appears.

Off by default and free when off (the op tests one attribute). On, with
``gspngen.compile(spec, check_finite=True)`` or ``GSPNGEN_CHECK_FINITE=1`` in
the environment when the op is compiled, every call checks

- its inputs (a non-finite value *came in*),
- its result (the op *produced* one from finite inputs),
- in the backward, the incoming gradient (came in) and the gradients the op
  produced for its inputs (produced),

and raises :class:`NonFiniteError` naming the first offending tensor, the
index of its first non-finite element and which of the two happened. Each
check reads the whole tensor and synchronises a GPU: a debugging mode.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .errors import NonFiniteError

ENV = "GSPNGEN_CHECK_FINITE"


def enabled(flag: Optional[bool]) -> bool:
    """The mode for a new op: the argument if given, else the environment variable."""
    if flag is not None:
        if not isinstance(flag, bool):
            raise TypeError(f"check_finite: expected True, False or None, got {flag!r}")
        return flag
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "0", "false", "off", "no"):
        return False
    if value in ("1", "true", "on", "yes"):
        return True
    raise ValueError(f"{ENV}: expected 1 or 0 (on/off), got {os.environ[ENV]!r}")


def first_nonfinite(t: torch.Tensor) -> Optional[tuple[tuple[int, ...], float]]:
    """(index, value) of the first non-finite element of ``t`` in row-major order, or None."""
    if not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta":
        return None
    bad = ~torch.isfinite(t.detach())
    if not bool(bad.any()):
        return None
    idx = tuple(int(i) for i in torch.nonzero(bad)[0])
    return idx, t.detach()[idx].item()


def check(named: Sequence[tuple[str, Optional[torch.Tensor]]], how: str, where: str) -> None:
    """Raise NonFiniteError for the first tensor of ``named`` holding a NaN or inf.

    ``how``: "came in" or "produced"; ``where``: the call, for the message.
    """
    for name, t in named:
        if t is None:
            continue
        hit = first_nonfinite(t)
        if hit is not None:
            idx, value = hit
            raise NonFiniteError(name, idx, value, how, where)


class _Guard(torch.autograd.Function):
    """Identity in the forward; in the backward checks the gradients passing through it."""

    @staticmethod
    def forward(ctx, names, how, where, *tensors):
        ctx.names, ctx.how, ctx.where = names, how, where
        return tensors if len(tensors) > 1 else tensors[0]

    @staticmethod
    def backward(ctx, *grads):
        check(list(zip(ctx.names, grads)), ctx.how, ctx.where)
        return (None, None, None, *grads)


def guard_inputs(names: Sequence[str], tensors: Sequence[Optional[torch.Tensor]], where: str) -> list:
    """The inputs, routed through a guard that checks the gradients the op produces for them."""
    idx = [i for i, t in enumerate(tensors) if t is not None and t.requires_grad]
    if not idx or not torch.is_grad_enabled():
        return list(tensors)
    out = _Guard.apply(tuple("g" + names[i] for i in idx), "produced", where + " backward",
                       *[tensors[i] for i in idx])
    out = out if isinstance(out, tuple) else (out,)
    result = list(tensors)
    for i, t in zip(idx, out):
        result[i] = t
    return result


def guard_output(y: torch.Tensor, where: str) -> torch.Tensor:
    """The result, routed through a guard that checks the incoming gradient in the backward."""
    if not y.requires_grad:
        return y
    return _Guard.apply(("gy",), "came in", where + " backward", y)
