"""Scan geometry (DESIGN §4): how each direction walks the image.

A *frame* is a view of a per-pixel tensor as (..., L, T): L lanes along the
neighbour axis (image coordinates, never flipped) and T steps in step order.
The reference and lowered backends compute in frames; the kernel renderers use
the same table to derive their index maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Direction:
    name: str
    step_axis: str  # "H" or "W": the image axis the scan walks along
    lane_axis: str  # the neighbour axis
    reverse: bool  # step order runs from the last index to 0


DIRECTION_TABLE = {
    "lr": Direction("lr", "W", "H", False),
    "rl": Direction("rl", "W", "H", True),
    "tb": Direction("tb", "H", "W", False),
    "bt": Direction("bt", "H", "W", True),
}


def image_dims(shape, layout: str) -> tuple[int, int, int, int]:
    """(N, C, H, W) of a 4-d per-pixel shape (x, or the merged result) in either layout."""
    if layout == "nhwc":
        N, H, W, C = shape
        return N, C, H, W
    N, C, H, W = shape
    return N, C, H, W


def to_channel_first(t: torch.Tensor, layout: str) -> torch.Tensor:
    """(..., H, W, C) -> (..., C, H, W) view for nhwc; identity for nchw."""
    return t.movedim(-1, -3) if layout == "nhwc" else t


def from_channel_first(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.movedim(-3, -1) if layout == "nhwc" else t


def to_frame(t: torch.Tensor, direction: str) -> torch.Tensor:
    """Channel-first (..., H, W) -> (..., L, T) in step order (a view or a flip)."""
    d = DIRECTION_TABLE[direction]
    f = t if d.step_axis == "W" else t.transpose(-1, -2)
    return f.flip(-1) if d.reverse else f


def from_frame(f: torch.Tensor, direction: str) -> torch.Tensor:
    """Inverse of :func:`to_frame`."""
    d = DIRECTION_TABLE[direction]
    if d.reverse:
        f = f.flip(-1)
    return f if d.step_axis == "W" else f.transpose(-1, -2)


def frame_extent(direction: str, H: int, W: int) -> tuple[int, int]:
    """(L, T): lanes and steps of a direction on an H x W image."""
    return (H, W) if DIRECTION_TABLE[direction].step_axis == "W" else (W, H)


def chunk_starts(T: int, chunk: int | None) -> list[bool]:
    """Whether each step (in step order) starts a chunk: t mod K == 0."""
    K = chunk or T or 1
    return [t % K == 0 for t in range(T)]


def neighbour_exists(L: int, k: int, device=None) -> torch.Tensor:
    """(k, L) bool: neighbour c (offset c - r) of lane i exists iff 0 <= i + c - r < L."""
    r = (k - 1) // 2
    i = torch.arange(L, device=device)
    o = torch.arange(k, device=device) - r
    j = i[None, :] + o[:, None]
    return (j >= 0) & (j < L)
