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
