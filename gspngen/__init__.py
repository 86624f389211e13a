"""gspngen: a compiler for GSPN (Generalized Spatial Propagation Network) kernels."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import GSPNOp, compile  # noqa: E402,A004
from .errors import SpecError  # noqa: E402
from .package import load_package  # noqa: E402
from .spec import Spec, load_spec  # noqa: E402

__all__ = ["Spec", "SpecError", "load_spec", "load_package", "compile", "GSPNOp", "__version__"]


def __getattr__(name: str):
    # Submodules with heavier imports load on first use.
    if name in ("nn", "analysis", "lower"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gspngen' has no attribute {name!r}")
