"""The interface every backend implements; the custom op dispatches to it.

Tensors reaching a backend are validated (see ``gspngen.validate``) and
contiguous in the spec's layout. ``forward`` returns the result and a
``saved`` tensor that the backend wants back in ``backward`` (an empty tensor
when it recomputes instead). ``backward`` returns gradients for
(x, w, lam, u, s, m), ``None`` for optional inputs the spec does not use.
"""

from __future__ import annotations

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

    def forward(self, spec: Spec, x, w, lam, u, s, m) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(self, spec: Spec, gy, x, w, lam, u, s, m, saved) -> Grads: ...


def result_shape(spec: Spec, x: torch.Tensor) -> tuple[int, ...]:
    """Output shape (DESIGN §3): x's shape, with a D axis at dim 1 for ``stack``."""
    if spec.merge == "stack":
        return (x.shape[0], spec.num_directions, *x.shape[1:])
    return tuple(x.shape)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for 16-bit storage, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
