"""examples/pathfinder.py end to end at a tiny size: the generator (deterministic, balanced, curves that
really connect or not) and both models training a couple of steps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pf():
    spec = importlib.util.spec_from_file_location("pathfinder", ROOT / "examples" / "pathfinder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GEN = dict(size=16, length=10, distractors=2)


def test_generator_is_deterministic_by_seed(pf):
    a, b, c = (pf.make_dataset(24, seed, **GEN) for seed in (3, 3, 4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (24, 1, 16, 16) and a[0].dtype == torch.float32
    assert set(a[1].tolist()) == {0, 1}


@pytest.mark.parametrize("size", [16, 32])
def test_markers_are_connected_exactly_when_the_label_says(pf, size):
    rng = np.random.default_rng(size)
    labels = []
    for _ in range(60):
        image, label, solid, (a, b) = pf.make_sample(rng, size=size, length=3 * size // 4, distractors=3)
        assert solid[tuple(a)] > 0 and solid[tuple(b)] > 0  # markers sit on curves
        assert image[tuple(a)] == pf.MARKER and image[tuple(b)] == pf.MARKER
        assert pf.connected(solid, a, b) == bool(label)
        # curves keep their clearance: no pixel of one curve touches another curve
        for cid in range(1, solid.max() + 1):
            others = (solid > 0) & (solid != cid)
            assert not (pf._dilate(solid == cid) & others).any()
        labels.append(label)
    assert 0.25 < np.mean(labels) < 0.75


def test_flood_fill(pf):
    solid = np.zeros((5, 5), np.int64)
    solid[0, 0] = solid[1, 1] = solid[2, 2] = 1  # diagonal steps connect (8-connectivity)
    solid[4, 4] = 2
    assert pf.connected(solid, (0, 0), (2, 2)) and not pf.connected(solid, (0, 0), (4, 4))


def test_models_match_in_size_and_train(pf, tmp_path):
    results = pf.main(["--size", "16", "--train", "48", "--test", "16", "--steps", "2", "--batch", "8",
                       "--dims", "8,16", "--depths", "1,1", "--eval-every", "1", "--backend", "reference",
                       "--json", str(tmp_path / "r.json")])
    assert set(results) == {"GSPN", "conv"}
    ratio = results["conv"]["params"] / results["GSPN"]["params"]
    assert 0.9 <= ratio <= 1.1, ratio
    for r in results.values():
        assert len(r["curve"]) == 2 and all(np.isfinite(loss) for _, loss, _ in r["curve"])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["results"]["GSPN"]["params"] == results["GSPN"]["params"]


def test_distance_baseline(pf):
    # two bins: close markers are positives, far ones negatives; an unseen bin gets the majority label
    m = lambda d: np.array([[0, 0], [0, d]])  # noqa: E731
    tr = np.stack([m(3), m(3), m(20), m(20), m(20)])
    te = np.stack([m(3), m(20), m(9)])
    assert pf.distance_baseline(tr, [1, 1, 0, 0, 0], te, [1, 0, 0]) == 1.0
    x, y, markers = pf.make_dataset(8, 0, with_markers=True, **GEN)
    assert markers.shape == (8, 2, 2) and torch.equal(x, pf.make_dataset(8, 0, **GEN)[0])


@pytest.mark.parametrize("name", ["GSPN", "conv"])
def test_models_can_overfit_a_few_samples(pf, name):
    """The sanity check that a training setup must pass before any claim about the task: memorise 16
    images. The mean-pooled head did not (see the README): the training collapsed to the class prior."""
    torch.manual_seed(0)
    x, y = pf.make_dataset(16, 0, **GEN)
    model = dict(zip(("GSPN", "conv"), pf.build_models(pf.ROOT / "examples" / "gspn4.yaml", (8, 16), (1, 1), 2,
                                                       "auto", pool="max")))[name]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert pf.accuracy(model, x, y) >= 0.9, loss.item()
