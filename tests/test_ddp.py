"""DDP: two gloo processes on CPU end with the same parameters as one process on the combined batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    port, world = free_port(), 2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = str(Path(__file__).with_name("ddp_worker.py"))
    procs = [subprocess.Popen([sys.executable, worker, str(r), str(world), str(port), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    ddp_params = torch.load(out, weights_only=True)

    model, images, labels = ddp_worker.make_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ddp_worker.train(model, images, labels)
    moved = 0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ddp_params[name], value, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(value, before[name]))
    assert moved > 0.9 * len(before)  # training changed (nearly) every parameter
