"""gspngen.runtime.host_alloc: large CPU outputs start on a huge-page boundary and behave as torch.empty."""

from __future__ import annotations

import sys

import pytest
import torch

from gspngen.runtime import host_alloc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_large_tensor_is_aligned_contiguous_and_writable(dtype):
    shape = (3, 5, 1024, 301)  # > MIN_BYTES for every dtype, not a multiple of a huge page
    t = host_alloc.empty(shape, dtype, fill=1.5)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    if sys.platform.startswith("linux"):
        assert t.data_ptr() % host_alloc.HUGE == 0
    assert (t == 1.5).all()
    t[-1, -1, -1, -1] = 7.0  # the last element lies inside the allocation
    assert t.flatten()[-1] == 7.0 and t.sum() == 1.5 * (t.numel() - 1) + 7.0


def test_small_and_empty_tensors_are_plain():
    small = host_alloc.empty((4, 4), torch.float32)
    assert small.shape == (4, 4) and small.storage_offset() == 0
    assert host_alloc.empty((0, 3), torch.float32).numel() == 0
    assert torch.isnan(host_alloc.empty((2, 2), torch.float64, fill=float("nan"))).all()


def test_freed_mapping_is_reused_only_when_no_view_remains(monkeypatch):
    monkeypatch.setenv("GSPNGEN_HOST_CACHE_MB", "1024")
    host_alloc.empty_cache()
    shape = (2, 1024, 1024)  # 8 MB of fp32: four huge pages
    a = host_alloc.empty(shape, torch.float32, fill=2.0)
    ptr = a.data_ptr()
    alive = a[1]  # a view keeps the mapping in use
    del a
    assert host_alloc.cached_bytes() == 0
    b = host_alloc.empty(shape, torch.float32)
    assert b.data_ptr() != ptr and (alive == 2.0).all()
    del alive
    assert host_alloc.cached_bytes() == 8 << 20
    c = host_alloc.empty(shape, torch.float32, fill=3.0)  # the same size class comes back, refilled
    assert c.data_ptr() == ptr and (c == 3.0).all() and host_alloc.cached_bytes() == 0
    del b, c
    host_alloc.empty_cache()
    assert host_alloc.cached_bytes() == 0


def test_cache_limit_is_honoured(monkeypatch):
    host_alloc.empty_cache()
    monkeypatch.setenv("GSPNGEN_HOST_CACHE_MB", "0")
    t = host_alloc.empty((3, 1024, 1024), torch.float32)
    del t
    assert host_alloc.cached_bytes() == 0
    monkeypatch.setenv("GSPNGEN_HOST_CACHE_MB", "10")
    ts = [host_alloc.empty((1024, 1024 + 512 * k), torch.float32) for k in range(3)]  # 4, 6, 8 MB classes
    del ts
    assert host_alloc.cached_bytes() <= 10 << 20
    monkeypatch.setenv("GSPNGEN_HOST_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="GSPNGEN_HOST_CACHE_MB"):
        host_alloc.empty((3, 1024, 1024), torch.float32)
    host_alloc.empty_cache()
