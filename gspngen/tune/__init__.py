"""The autotuner (DESIGN §5): candidates, verification, timing, the per-device cache.

One job per module, in pipeline order:

- :mod:`.timing`: the timing code shared with ``gspngen bench``.
- :mod:`.device`: who this device is (the cache file's identity).
- :mod:`.keys`: the cache entry key (spec, generator, toolchain, dtype, pass, shape bucket).
- :mod:`.cache`: the per-device JSON file: locking, merging, recovery.
- :mod:`.candidates`: which (backend, config) pairs may run here.
- :mod:`.tuner`: verify each candidate, time it, choose, store; the run-time lookup.
- :mod:`.replay`: the same selection on recorded timings, without kernels.

Importing this package is cheap; the submodules import torch and friends.
"""


def __getattr__(name: str):
    # ``gspngen.tune.tune(...)`` and ``gspngen.tune.replay(...)`` without importing the tuner up front.
    if name == "tune":
        from .tuner import tune

        return tune
    if name == "replay":
        from .replay import replay

        return replay
    raise AttributeError(f"module 'gspngen.tune' has no attribute {name!r}")
