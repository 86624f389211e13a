"""The Triton backend: a spec's rendered Triton kernels behind the Backend protocol.

CUDA tensors run compiled kernels; CPU tensors run through Triton's
interpreter, which only happens when TRITON_INTERPRET=1 (how CI tests it).
Rendering, loading and launching live in :mod:`gspngen.runtime.triton_launch`.
"""

from __future__ import annotations

import torch

from ..spec import Spec
from .base import Grads


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class TritonBackend:
    name = "triton"

    def __init__(self, config=None):
        from ..runtime import triton_launch

        self._launch = triton_launch
        self.config = config if config is not None else triton_launch.DEFAULT_CONFIG

    def available(self, device: torch.device) -> bool:
        device = torch.device(device)
        if not _triton_importable():
            return False
        if device.type == "cuda":
            return torch.cuda.is_available()
        return device.type == "cpu" and self._launch.interpreter_enabled()

    def unavailable_reason(self, device: torch.device):
        device = torch.device(device)
        if not _triton_importable():
            return "triton is not installed (pip install 'gspngen[triton]')"
        if device.type == "cpu" and not self._launch.interpreter_enabled():
            return ("Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 before "
                    "triton is imported (slow, for testing); for speed on CPU use backend='cpu' or 'auto'")
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        if device.type not in ("cpu", "cuda"):
            return f"no Triton target for device type {device.type}"
        return None

    def saved_shape(self, spec: Spec, x: torch.Tensor):
        return self._launch.saved_shape(spec, x), self._launch.SAVED_DTYPE

    def _check(self, x: torch.Tensor) -> None:
        if x.dtype not in self._launch.SUPPORTED_DTYPES:
            raise TypeError(f"x: the triton backend stores fp32, fp16 or bf16, got {x.dtype}")
        if not self.available(x.device):
            raise ValueError(f"x: the triton backend cannot run on device {x.device} here: "
                             f"{self.unavailable_reason(x.device)}")

    def forward(self, spec: Spec, x, w, lam, u, s, m):
        self._check(x)
        return self._launch.forward(spec, x, w, lam, u, s, m, self.config)

    def backward(self, spec: Spec, gy, x, w, lam, u, s, m, saved) -> Grads:
        self._check(x)
        want = self._launch.saved_shape(spec, x)
        if tuple(saved.shape) != want or saved.dtype != self._launch.SAVED_DTYPE:
            raise ValueError(f"saved: expected the stored h of shape {want} and dtype {self._launch.SAVED_DTYPE} "
                             f"from the triton "
                             f"forward, got shape {tuple(saved.shape)} and dtype {saved.dtype}")
        expect = (x.shape[0], spec.num_directions, *x.shape[1:]) if spec.merge == "stack" else tuple(x.shape)
        if tuple(gy.shape) != expect:
            raise ValueError(f"gy: expected shape {expect}, got {tuple(gy.shape)}")
        return self._launch.backward(spec, gy.contiguous(), x, w, lam, u, s, m, saved, self.config)
