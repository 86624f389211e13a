"""Shared test set-up: Hypothesis profiles and the Triton interpreter on CPU."""

import os

# Triton kernels run on CPU tensors through the interpreter; must be set before triton is imported.
# On a GPU machine set TRITON_INTERPRET=0 to test the compiled kernels (scripts/device_check.sh does).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_gspngen_cache(tmp_path_factory):
    """No test writes into ~/.cache: the whole session (each xdist worker) gets its own cache folder,
    and GSPNGEN_AUTOTUNE from the caller's shell does not leak in (tests that need it set it)."""
    saved = {k: os.environ.get(k) for k in ("GSPNGEN_CACHE_DIR", "GSPNGEN_AUTOTUNE")}
    os.environ["GSPNGEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("gspngen-cache"))
    os.environ.pop("GSPNGEN_AUTOTUNE", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=10, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
