"""Who this device is: the identity a tuned table belongs to (file name and header of the cache).

Timings only transfer between identical devices, so the identity names what
changes them: on a GPU its name, compute capability, SM count and memory; on
the CPU its model name, core count and the ISA flags a compiler may use.
:func:`device_id` turns an identity into a short file-name-safe string.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from functools import lru_cache
from typing import Any

import torch

# ISA flags that change generated CPU code (vector widths, FMA); the rest of /proc/cpuinfo's list is noise.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
             "avx512_fp16", "amx_bf16", "amx_tile", "neon", "asimd", "sve", "sve2", "bf16", "fphp", "asimdhp")


def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    """(model name, ISA flags) from /proc/cpuinfo where it exists, else what ``platform`` knows."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown cpu"
    return model, tuple(f for f in ISA_FLAGS if f in flags)


@lru_cache(maxsize=None)
def _cpu_identity() -> tuple[tuple[str, Any], ...]:
    model, flags = _cpuinfo()
    return (("type", "cpu"), ("name", model), ("machine", platform.machine()), ("cores", os.cpu_count() or 1),
            ("isa", list(flags)))


@lru_cache(maxsize=None)
def _gpu_identity(index: int) -> tuple[tuple[str, Any], ...]:
    props = torch.cuda.get_device_properties(index)
    return (("type", "cuda"), ("name", props.name), ("cc", f"{props.major}.{props.minor}"),
            ("sms", props.multi_processor_count), ("memory_gib", round(props.total_memory / 2**30)))


def identity(device: "torch.device | str") -> dict[str, Any]:
    """The device's identity as a JSON-ready dict (cached per process)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return dict(_gpu_identity(index))
    if device.type == "cpu":
        return dict(_cpu_identity())
    raise ValueError(f"device: expected cuda or cpu, got {str(device)!r}")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "unknown"


def device_id(ident: dict[str, Any]) -> str:
    """A file-name-safe id: readable part plus a digest of the whole identity.

    ``cuda-nvidia-h200-cc9.0-132sm-140gib-1a2b3c4d`` or ``cpu-intel-xeon-...-2c-1a2b3c4d``.
    """
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]
    if ident.get("type") == "cuda":
        readable = f"cuda-{_slug(ident['name'])}-cc{ident['cc']}-{ident['sms']}sm-{ident['memory_gib']}gib"
    else:
        readable = f"cpu-{_slug(str(ident.get('name', '')))}-{ident.get('cores')}c"
    return f"{readable}-{digest}"
