"""The Triton backend: a spec's rendered Triton kernels behind the Backend protocol.

CUDA tensors run compiled kernels; CPU tensors run through Triton's
interpreter, which only happens when TRITON_INTERPRET=1 (how CI tests it).
Rendering, loading and launching live in :mod:`gspngen.runtime.triton_launch`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..spec import Spec
from .base import Grads, parse_config_key


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def config_key(config) -> str:
    """A TritonConfig as a config key: ``"bc=4,nw=4,ns=2"``, with ``",st=4"`` when it tiles lr/rl steps."""
    key = f"bc={config.block_c},nw={config.num_warps},ns={config.num_stages}"
    return key + (f",st={config.steps}" if config.steps != 1 else "")


def parse_key(key: str):
    """A config key as a TritonConfig ("" is the default); ValueError naming ``backend`` if malformed."""
    from ..runtime.triton_launch import DEFAULT_CONFIG, TritonConfig

    if not key:
        return DEFAULT_CONFIG
    fields = parse_config_key(key, "backend")
    names = {"bc": "block_c", "nw": "num_warps", "ns": "num_stages", "st": "steps"}
    if not {"bc", "nw", "ns"} <= set(fields) <= set(names):
        raise ValueError(f"backend: a triton config key is 'bc=B,nw=W,ns=S' or 'bc=B,nw=W,ns=S,st=T', got {key!r}")
    try:
        return TritonConfig(**{names[k]: int(v) for k, v in fields.items()})
    except ValueError as exc:
        raise ValueError(f"backend: triton config {key!r}: {exc}") from None


class TritonBackend:
    """``config`` runs the forward, ``bwd_config`` the backward (default: ``config``)."""

    name = "triton"

    def __init__(self, config=None, bwd_config=None):
        from ..runtime import triton_launch

        self._launch = triton_launch
        self.config = config if config is not None else triton_launch.DEFAULT_CONFIG
        self.bwd_config = bwd_config if bwd_config is not None else self.config

    # -- the config protocol ---------------------------------------------------
    def candidates(self, spec: Spec, dtype: str, pass_: str, shape) -> list[str]:
        """The default, then every config of ``CONFIGS`` that launches differently at this shape.

        Configs that plan_tile reduces to the same tiles are one candidate, and
        more warps than a tile has elements are left out (they only idle).
        """
        launch = self._launch
        N, C, H, W = shape

        def effective(cfg):
            plans = launch.plan_launches(spec, N, C, H, W, cfg, pass_="backward" if pass_ == "bwd" else "forward")
            return tuple((p.group.directions, p.group.block_l, p.tile.block_c, p.tile.num_warps, p.steps)
                         for p in plans), cfg.num_stages

        seen = {effective(launch.DEFAULT_CONFIG)}
        keys = [""]
        for cfg in launch.CONFIGS:
            eff = effective(cfg)
            biggest = max(bc * block_l * st for _, block_l, bc, _, st in eff[0])
            if eff in seen or 32 * cfg.num_warps > max(biggest, 64):
                continue
            seen.add(eff)
            keys.append(config_key(cfg))
        return keys

    def with_config(self, fwd: str = "", bwd: str = "") -> "TritonBackend":
        return TritonBackend(parse_key(fwd), parse_key(bwd))

    def available(self, device: torch.device) -> bool:
        device = torch.device(device)
        if not _triton_importable():
            return False
        if device.type == "cuda":
            return torch.cuda.is_available()
        return device.type == "cpu" and self._launch.interpreter_enabled()

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
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

    skips_saved = True  # forward(..., need_saved=False): SAVE_H=False, no h store

    def forward(self, spec: Spec, x, w, lam, u, s, m, need_saved: bool = True):
        self._check(x)
        return self._launch.forward(spec, x, w, lam, u, s, m, self.config, need_saved=need_saved)

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
        return self._launch.backward(spec, gy.contiguous(), x, w, lam, u, s, m, saved, self.bwd_config)
