"""One rank of tests/test_ddp.py: train a small GSPN backbone with DistributedDataParallel (gloo, CPU).

Usage: python tests/ddp_worker.py RANK WORLD_SIZE PORT OUT.pt — rank r trains on its slice of the batch
that ``make_problem`` builds; rank 0 saves the final parameters to OUT.pt.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

STEPS, LR = 3, 0.1


def make_problem():
    """The same model (seeded) and the same full batch in every process."""
    import gspngen
    from gspngen.nn import GSPNBackbone

    torch.manual_seed(0)
    spec = gspngen.Spec.from_dict({"name": "ddp", "modulation": True, "skip": True, "merge": "learned"})
    model = GSPNBackbone(spec, in_chans=1, dims=(4, 8), depths=(1, 1), patch_size=2, num_classes=2,
                         d_state=4, mlp_ratio=2, backend="reference")
    images = torch.randn(8, 1, 8, 8)
    labels = torch.randint(0, 2, (8,))
    return model, images, labels


def train(model, images, labels, steps=STEPS):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    return model


def main(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, images, labels = make_problem()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        per = images.shape[0] // world  # equal slices: the mean of per-rank mean losses is the full mean
        sl = slice(rank * per, (rank + 1) * per)
        train(ddp, images[sl], labels[sl])
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
