"""Pathfinder: a long-range task where a GSPN network should beat a convolutional one of the same size.

Each image shows dashed curves; two of them are long, the rest are shorter distractors. Two markers sit
on curve ends: on both ends of one long curve (label 1, "connected") or on one end of each long curve
(label 0). Curves never touch, so "connected" means "on the same curve", which a flood fill over the
solid (undashed) curves decides; tests/test_pathfinder.py checks that. The clearance between curves is
two pixels (``clearance``), wider than a dash gap: with one pixel, the gap between two different curves
looked exactly like the gap inside a dashed curve (both a Chebyshev distance of 2), and a flood fill
over the image pixels that jumps dash gaps agreed with the label on only 84 % of samples (96 % with two). Deciding it
from pixels needs context along a whole curve: a stack of 3x3 convolutions sees a few pixels per layer,
a GSPN scan sees the whole image in every layer (Linsley et al. 2018; Long Range Arena, Tay et al. 2021).

The two networks share everything (patch embedding, stages, LayerNorms, MLPs, head: a
``gspngen.nn.GSPNBackbone``) except the spatial mixer of each block: the GSPN mixer (``GSPN2d``, four
directions, k = 3), or a 3x3 convolution to ``h`` channels, GELU, and a 1x1 convolution back, with
``h`` chosen so the parameter counts agree within 10 %. Same depth, same data, same optimiser and steps
(the learning rate is each model's best of those tried). The head max-pools the last stage's tokens: a
mean over 64 mostly empty tokens left the images' features nearly equal, and training collapsed them
to the class prior (README). Ends of one curve lie closer together than ends of two, so the marker
distance alone beats chance; the table reports that shortcut's accuracy as the bar to beat.

    python examples/pathfinder.py --threads 2 --out docs/pathfinder.png --json pathfinder.json

prints a markdown table for the README and writes the learning curves (PNG) and the numbers (JSON).
Use ``--steps``/``--train``/``--size`` for short runs; ``--backend auto`` picks the fastest backend here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from gspngen.nn import Conv1x1, GSPN2d, GSPNBackbone  # noqa: E402

CURVE, MARKER = 0.5, 1.0  # pixel values: dashed curves, and the two markers


# -- data ----------------------------------------------------------------------------------------------


def _curve(rng: np.random.Generator, size: int, length: int, blocked: np.ndarray, curvature: float):
    """Pixels (length, 2) of a smooth random walk that stays inside and off ``blocked``, or None."""
    y, x = (float(v) for v in rng.uniform(2, size - 2, 2))  # plain floats: numpy per step was most of the time
    angle = rng.uniform(0, 2 * math.pi)
    pts: list[tuple[int, int]] = []
    for _ in range(8 * length):
        angle += rng.normal(0.0, curvature)
        y, x = y + 0.5 * math.cos(angle), x + 0.5 * math.sin(angle)  # half-pixel steps: 8-connected
        p = (int(round(y)), int(round(x)))
        if not (0 <= p[0] < size and 0 <= p[1] < size) or blocked[p]:
            return None
        if not pts or p != pts[-1]:
            if p in pts[:-1]:  # a curve that runs into itself would end next to its own body
                return None
            pts.append(p)
        if len(pts) == length:
            return np.array(pts)
    return None


def _dilate(mask: np.ndarray) -> np.ndarray:
    """8-neighbourhood dilation by one pixel."""
    out = mask.copy()
    padded = np.pad(mask, 1)
    n = mask.shape[0]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= padded[1 + dy:1 + dy + n, 1 + dx:1 + dx + n]
    return out


def make_sample(rng: np.random.Generator, size: int = 32, length: int = 24, distractors: int = 3,
                dash: int = 3, gap: int = 1, curvature: float = 0.25, clearance: int = 2):
    """One image: (image (size, size) float32, label 0/1, solid curve ids (size, size) int, markers (2, 2)).

    ``solid`` numbers the curves 1, 2, ... (0 is background) before dashing: the ground truth for the
    connectivity check. Curves 1 and 2 are the long ones (``length`` pixels), the others distractors of
    ``length // 2``.
    """
    while True:
        solid = np.zeros((size, size), np.int64)
        curves = []
        ok = True
        for i in range(2 + distractors):
            n = length if i < 2 else max(2, length // 2)
            blocked = solid > 0  # the same for every attempt at this curve: dilate once
            for _ in range(clearance):
                blocked = _dilate(blocked)
            for _ in range(100):
                pts = _curve(rng, size, n, blocked, curvature)
                if pts is not None:
                    break
            else:
                ok = False
                break
            solid[pts[:, 0], pts[:, 1]] = i + 1
            curves.append(pts)
        if ok:
            break
    label = int(rng.integers(0, 2))
    if label:  # both ends of one long curve
        markers = np.stack([curves[0][0], curves[0][-1]])
    else:  # one end of each long curve
        markers = np.stack([curves[0][int(rng.integers(0, 2)) * -1], curves[1][int(rng.integers(0, 2)) * -1]])
    image = np.zeros((size, size), np.float32)
    for pts in curves:
        on = (np.arange(len(pts)) % (dash + gap)) < dash
        image[pts[on, 0], pts[on, 1]] = CURVE
    for y, x in markers:  # a 3x3 square, clipped at the border
        image[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = MARKER
    return image, label, solid, markers


def make_dataset(n: int, seed: int, with_markers: bool = False, **kw):
    """n samples as tensors (images (n, 1, S, S) float32, labels (n,) int64); the seed fixes them.
    ``with_markers`` adds the marker positions (n, 2, 2) (for ``distance_baseline``)."""
    rng = np.random.default_rng(seed)
    samples = [make_sample(rng, **kw) for _ in range(n)]
    images = torch.from_numpy(np.stack([s[0] for s in samples])[:, None])
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    if with_markers:
        return images, labels, np.stack([s[3] for s in samples])
    return images, labels


def distance_baseline(train_markers, train_labels, test_markers, test_labels) -> float:
    """Test accuracy of a classifier that sees only the distance between the two markers (1-pixel bins,
    majority label of the training samples in the bin). Ends of one curve lie closer together than ends
    of two curves, so this shortcut beats chance; a model must beat it to show it follows curves."""
    def bins(m):
        return np.floor(np.hypot(*(m[:, 0] - m[:, 1]).T)).astype(int)

    btr, bte, ytr = bins(train_markers), bins(test_markers), np.asarray(train_labels)
    majority = int(ytr.mean() > 0.5)
    vote = {b: int(ytr[btr == b].mean() > 0.5) for b in np.unique(btr)}
    pred = np.array([vote.get(b, majority) for b in bte])
    return float((pred == np.asarray(test_labels)).mean())


def connected(solid: np.ndarray, a, b) -> bool:
    """Whether pixel b is reachable from pixel a over solid curve pixels (8-connected flood fill)."""
    size = solid.shape[0]
    seen = np.zeros_like(solid, bool)
    stack = [tuple(a)]
    while stack:
        y, x = stack.pop()
        if not (0 <= y < size and 0 <= x < size) or seen[y, x] or solid[y, x] == 0:
            continue
        seen[y, x] = True
        stack.extend((y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return bool(seen[tuple(b)])


# -- models --------------------------------------------------------------------------------------------


class ConvMixer(nn.Module):
    """The convolutional stand-in for GSPN2d: 3x3 convolution dim -> hidden, GELU, 1x1 back to dim."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.local = nn.Conv2d(dim, hidden, 3, padding=1)
        self.act = nn.GELU()
        self.out = Conv1x1(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.local(x)))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_models(spec, dims, depths, patch: int, backend: str, d_state=None, pool: str = "mean"):
    """(GSPN network, convolutional network): the same backbone, the mixers swapped, sizes within 10 %."""
    kw = dict(in_chans=1, dims=dims, depths=depths, patch_size=patch, num_classes=2, d_state=d_state, pool=pool)
    gspn = GSPNBackbone(spec, backend=backend, **kw)
    conv = GSPNBackbone(spec, backend=backend, **kw)
    for stage in conv.stages:
        for block in stage:
            dim = block.dim
            p = n_params(block.mixer)
            hidden = max(1, round((p - dim) / (10 * dim + 1)))  # 9*dim*h + h + h*dim + dim parameters
            block.mixer = ConvMixer(dim, hidden)
    return gspn, conv


# -- training ------------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model, images, labels, batch: int = 256) -> float:
    model.eval()
    hits = sum((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
               for i in range(0, len(images), batch))
    model.train()
    return hits / len(images)


def train(model, data, steps: int, batch: int, lr: float, eval_every: int, seed: int, log=print,
          weight_decay: float = 0.05, warmup: float = 0.1):
    """AdamW with a cosine schedule; returns the curve [(step, train loss, test accuracy), ...] and seconds."""
    (xtr, ytr), (xte, yte) = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, round(steps * warmup))  # linear warm-up over this fraction of the steps, then a cosine decay to zero
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))))
    curve, losses, start = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(xtr), (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            acc = accuracy(model, xte, yte)
            curve.append((step, float(np.mean(losses[-eval_every:])), acc))
            log(f"  step {step:5d}  loss {curve[-1][1]:.4f}  test acc {acc:.3f}  ({time.perf_counter() - start:.0f} s)")
    return curve, time.perf_counter() - start


def plot(results: dict, path: Path, title: str, shortcut: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, r in results.items():
        steps, loss, acc = zip(*r["curve"])
        a.plot(steps, loss, label=f"{name} ({r['params']:,} params)")
        b.plot(steps, acc, label=name)
    a.set(xlabel="step", ylabel="train loss", title="training loss")
    b.set(xlabel="step", ylabel="test accuracy", title="test accuracy", ylim=(0.4, 1.0))
    b.axhline(0.5, color="grey", lw=0.8, ls=":")
    if shortcut is not None:
        b.axhline(shortcut, color="grey", lw=0.8, ls="--", label="marker distance only")
    a.legend()
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(results: dict, args, shortcut: float) -> str:
    head = ("| model | params | blocks | final train loss | final test accuracy | best test accuracy | train time |\n"
            "|---|---:|---:|---:|---:|---:|---:|")
    rows = [f"| {name} | {r['params']:,} | {sum(args.depths)} | {r['curve'][-1][1]:.3f} | "
            f"{r['curve'][-1][2]:.3f} | {max(c[2] for c in r['curve']):.3f} | {r['seconds']:.0f} s |"
            for name, r in results.items()]
    rows.append(f"| marker distance only | 0 | - | - | {shortcut:.3f} | - | - |")
    backend = next(iter(results.values()))["backend"]
    note = (f"\n{args.size}x{args.size} images, curves of {args.length} pixels, {args.distractors} distractors, "
            f"{args.train} training / {args.test} test samples, {args.steps} steps of batch {args.batch}, "
            f"lr {args.lr:g} (GSPN {args.lr_gspn or args.lr:g}), {args.pool} pool, seed {args.seed}, backend {backend!r}.")
    return "\n".join([head, *rows]) + "\n" + note


def parse_args(argv=None):
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=32, help="image side (32 or 64)")
    p.add_argument("--length", type=int, default=None,
                   help="pixels of a long curve (default half of --size; 3/4 did not train in 15 minutes, see README)")
    p.add_argument("--distractors", type=int, default=1, help="shorter curves besides the two long ones")
    p.add_argument("--dash", type=int, default=3, help="pixels drawn per dash")
    p.add_argument("--gap", type=int, default=1, help="pixels left out between dashes (0: solid curves)")
    p.add_argument("--train", type=int, default=4000, help="training samples")
    p.add_argument("--test", type=int, default=500, help="test samples")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the conv's best of 1e-3, 3e-3, 1e-2)")
    p.add_argument("--lr-gspn", type=float, default=3e-3, help="the GSPN model's (trained faster than at 1e-3)")
    p.add_argument("--wd", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps spent in linear warm-up")
    p.add_argument("--dims", type=ints, default=(16, 32))
    p.add_argument("--depths", type=ints, default=(2, 2))
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--d-state", type=int, default=None)
    p.add_argument("--pool", choices=["mean", "max"], default="max",
                   help="the head's global pooling (mean collapsed to the class prior, see README)")
    p.add_argument("--spec", default=str(ROOT / "examples" / "gspn4.yaml"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--models", default="GSPN,conv", help="which models to train")
    p.add_argument("--out", type=Path, default=None, help="learning-curve PNG")
    p.add_argument("--json", type=Path, default=None, help="results as JSON")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.length = length = args.length or args.size // 2
    gen = dict(size=args.size, length=length, distractors=args.distractors, dash=args.dash, gap=args.gap)
    t0 = time.perf_counter()
    (xtr, ytr, mtr), (xte, yte, mte) = (make_dataset(args.train, args.seed, with_markers=True, **gen),
                                        make_dataset(args.test, args.seed + 1, with_markers=True, **gen))
    data = ((xtr, ytr), (xte, yte))
    shortcut = distance_baseline(mtr, ytr.numpy(), mte, yte.numpy())
    print(f"data: {args.train} + {args.test} samples of {args.size}x{args.size} in {time.perf_counter() - t0:.1f} s, "
          f"{ytr.float().mean().item():.2f} positive; marker-distance-only baseline: test acc {shortcut:.3f}")
    torch.manual_seed(args.seed)
    gspn, conv = build_models(args.spec, args.dims, args.depths, args.patch, args.backend, args.d_state,
                              args.pool)
    backend = gspn.stages[0][0].mixer.op.resolve_backend(data[0][0])
    results = {}
    for name, model in (("GSPN", gspn), ("conv", conv)):
        if name not in args.models.split(","):
            continue
        print(f"{name}: {n_params(model):,} parameters")
        lr = args.lr_gspn if name == "GSPN" and args.lr_gspn else args.lr
        curve, seconds = train(model, data, args.steps, args.batch, lr, args.eval_every, args.seed,
                               weight_decay=args.wd, warmup=args.warmup)
        results[name] = {"params": n_params(model), "curve": curve, "seconds": seconds, "backend": backend, "lr": lr}
    if "GSPN" in results and "conv" in results:
        ratio = results["conv"]["params"] / results["GSPN"]["params"]
        print(f"parameter ratio conv/GSPN = {ratio:.3f}")
    if results:
        print("\n" + markdown_table(results, args, shortcut))
    if args.out:
        plot(results, args.out, f"Pathfinder {args.size}x{args.size}, curves of {args.length} px, "
             f"{args.distractors} distractors, {args.steps} steps", shortcut)
        print(f"wrote {args.out}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(args).items()}, "results": results, "distance_baseline": shortcut}, indent=1))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
