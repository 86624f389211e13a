"""The interface every backend implements; the custom op dispatches to it.

Tensors reaching a backend are validated (see ``gspngen.validate``) and
contiguous in the spec's layout. ``forward`` returns the result and a
``saved`` tensor that the backend wants back in ``backward`` (an empty tensor
when it recomputes instead, or when called with ``need_saved=False``: a forward
that declares that keyword stores no h then; the in-tree backends say so with
``skips_saved = True``). ``backward`` returns gradients for
(x, w, lam, u, s, m), ``None`` for optional inputs the spec does not use.
"""

from __future__ import annotations

import re
from typing import Optional, Protocol

import torch

from ..spec import Spec

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor,
              Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


class Backend(Protocol):
    name: str

    def available(self, device: torch.device) -> bool: ...

    def saved_shape(self, spec: Spec, x: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of the ``saved`` tensor (for fake tensors / torch.compile)."""
        ...

    def forward(self, spec: Spec, x, w, lam, u, s, m, need_saved: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``need_saved=False`` (no input needs a gradient; passed only to a forward that declares the keyword):
        ``saved`` may be an empty tensor and the kernels need not store it (inference moves fewer bytes)."""
        ...


    def backward(self, spec: Spec, gy, x, w, lam, u, s, m, saved) -> Grads: ...

    # -- the config protocol (the autotuner's view of a backend) ---------------
    # A *config key* is a short canonical string of ``name=value`` pairs joined
    # by commas, e.g. ``"cb=8,tile=32"``, characters ``[a-z0-9_=,.-]`` only;
    # ``""`` is the documented default. Backends without tunings (reference,
    # lowered) inherit :class:`Untuned`.

    def candidates(self, spec: Spec, dtype: str, pass_: str, shape: tuple[int, int, int, int]) -> list[str]:
        """Config keys the tuner may time for ``pass_`` ("fwd" | "bwd") on ``shape`` (N, C, H, W) in
        storage ``dtype`` ("fp32" | "fp16" | "bf16" | "fp64"); the default ("" or its explicit key) first."""
        ...

    def with_config(self, fwd: str = "", bwd: str = "") -> "Backend":
        """This backend running the forward config ``fwd`` and the backward config ``bwd``
        (ValueError naming the key if it is not one of this backend's)."""
        ...

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None when the backend can run on ``device`` here, else one line saying why not."""
        ...


_KEY = re.compile(r"[a-z0-9_=,.\-]{0,200}")


def check_config_key(key: str, what: str = "config") -> str:
    """A config key as given, or ValueError naming ``what``: keys reach kernel names, so no other characters."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"{what}: a config key is up to 200 characters of [a-z0-9_=,.-], got {key!r}")
    return key


def parse_config_key(key: str, what: str = "config") -> dict[str, str]:
    """``"cb=8,tile=32"`` -> ``{"cb": "8", "tile": "32"}`` (ValueError naming ``what`` if malformed)."""
    check_config_key(key, what)
    out: dict[str, str] = {}
    for part in filter(None, key.split(",")):
        name, eq, value = part.partition("=")
        if not eq or not name or not value or name in out:
            raise ValueError(f"{what}: expected name=value pairs joined by commas, got {key!r}")
        out[name] = value
    return out


class Untuned:
    """The config protocol for a backend with one configuration (reference, lowered)."""

    name: str

    def candidates(self, spec: Spec, dtype: str, pass_: str, shape) -> list[str]:
        return [""]

    def with_config(self, fwd: str = "", bwd: str = ""):
        if fwd or bwd:
            raise ValueError(f"backend: {self.name!r} has no configurations, got {fwd!r}|{bwd!r}")
        return self

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None if self.available(device) else f"{self.name} cannot run on {torch.device(device).type} here"


def result_shape(spec: Spec, x: torch.Tensor) -> tuple[int, ...]:
    """Output shape (DESIGN §3): x's shape, with a D axis at dim 1 for ``stack``."""
    if spec.merge == "stack":
        return (x.shape[0], spec.num_directions, *x.shape[1:])
    return tuple(x.shape)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for 16-bit storage, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
