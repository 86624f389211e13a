"""gspngen heatmap SPEC [--size H,W] [--pixel I,J] [--seed S] [--input FILE.pt] -o FILE.png"""

from __future__ import annotations

import textwrap

from pathlib import Path

from ..cli import CLIError, parse_ints, seed

DIRECTION_TITLES = {"lr": "lr: left \u2192 right", "rl": "rl: right \u2192 left",
                    "tb": "tb: top \u2192 bottom", "bt": "bt: bottom \u2192 top"}
DYNAMIC_RANGE = 1e-12  # the colour scale spans this many decades below the largest value at most


def register(sub) -> None:
    p = sub.add_parser(
        "heatmap",
        help="plot how strongly every input pixel influences one output pixel, per direction and aggregated",
        description="Draw affinity maps A[q] = sum over channels of |dy[p]/dx[q]| for one output pixel p: one "
                    "panel per scan direction and one for the merged output, on a shared logarithmic colour "
                    "scale. Inputs are random (fixed seed) unless --input gives them. Needs matplotlib.",
    )
    p.add_argument("spec", metavar="SPEC", help="path to a YAML spec (see examples/)")
    p.add_argument("-o", "--output", metavar="FILE.png", required=True, help="where to write the PNG")
    p.add_argument("--size", metavar="H,W", help="image size (default 32,32; taken from --input if given)")
    p.add_argument("--pixel", metavar="I,J", help="output pixel (row, column); default the centre")
    p.add_argument("--channels", type=int, default=None, metavar="C",
                   help="channels of the random inputs (default 4, or the smallest multiple of weight_groups)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--input", metavar="FILE.pt",
                   help="a dict of input tensors (x, w, lam and u, s, m as the spec needs) saved with torch.save")
    p.add_argument("--backend", default="auto", help="backend to differentiate through (default auto)")
    p.set_defaults(func=run)


def _load_inputs(path: str, spec) -> dict:
    import torch

    from ..testing import ARG_NAMES
    from ..validate import validate_inputs

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CLIError(f"--input: no such file {path!r}") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one user error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CLIError(f"--input: cannot load {path!r} as a torch.save file of tensors ({first[:120]})") from None
    if not isinstance(data, dict):
        raise CLIError(f"--input: expected a dict of tensors with keys {', '.join(ARG_NAMES)}, "
                       f"got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in ARG_NAMES)
    if unknown:
        raise CLIError(f"--input: unexpected keys {unknown}; expected {', '.join(ARG_NAMES)}")
    inputs = {k: data.get(k) for k in ARG_NAMES}
    try:
        validate_inputs(spec, **inputs)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--input: {exc}") from None
    return inputs


def run(args) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError("matplotlib is required for heatmaps: pip install 'gspngen[plot]'") from None
    import torch

    out_path, fmt = _output_file(args.output)  # before any work
    from ..analysis import affinity
    from ..api import KERNEL_BACKENDS, GSPNOp
    from ..backends import BACKEND_NAMES
    from ..check import small_channels
    from ..geometry import image_dims
    from ..spec import load_spec
    from ..testing import make_inputs

    spec = load_spec(args.spec)
    if args.backend != "auto" and args.backend not in BACKEND_NAMES:
        raise CLIError(f"--backend: expected auto or one of {', '.join(BACKEND_NAMES)}, got {args.backend!r}")
    size = parse_ints(args.size, "H,W", "--size") if args.size else None
    if args.input:
        inputs = _load_inputs(args.input, spec)
        x = inputs["x"]
        hw = image_dims(x.shape, spec.layout)[2:]
        if size is not None and size != hw:
            raise CLIError(f"--size: the inputs in {args.input} are {hw[0]},{hw[1]}, got {size[0]},{size[1]}")
        size = hw
        source = f"inputs from {args.input}"
    else:
        size = size or (32, 32)
        C = args.channels if args.channels is not None else small_channels(spec)
        if C < 1 or C % spec.groups(C):
            raise CLIError(f"--channels: expected a positive multiple of weight_groups={spec.weight_groups}, got {C}")
        # float64 where the backend takes it: the far tail of the maps spans many decades
        dtype = torch.float32 if args.backend in KERNEL_BACKENDS else torch.float64
        inputs = make_inputs(spec, 1, C, *size, dtype=dtype, seed=args.seed)
        source = f"random inputs, seed {args.seed}, C={C}"
    H, W = size
    pixel = parse_ints(args.pixel.replace(" ", ""), "I,J", "--pixel", minimum=0) if args.pixel else None
    if pixel is None:
        pixel = (H // 2, W // 2)
    elif not (pixel[0] < H and pixel[1] < W):
        raise CLIError(f"--pixel: expected I < {H} and J < {W} for size {H},{W}, got {pixel[0]},{pixel[1]}")
    try:
        op = GSPNOp(spec, args.backend)
        maps = affinity(op, inputs, pixel=tuple(pixel))
    except ImportError as exc:
        raise CLIError(f"--backend {args.backend}: not installed here ({exc.name or exc})") from None
    except (TypeError, ValueError) as exc:  # e.g. a backend that cannot run these inputs here
        raise CLIError(f"--backend {args.backend}: {exc}") from None
    subtitle = f"{source}, size {H}x{W}"
    fig = plot_affinity(maps, spec, subtitle)
    _save(fig, out_path, fmt)
    print(f"wrote {args.output}: {len(maps.panels())} panels (spec '{spec.name}', output pixel {pixel[0]},{pixel[1]})")
    return 0


def _output_file(name: str) -> tuple[Path, str]:
    """(path, image format) for -o, or a CLIError: a known format, a file name, an existing folder."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(name)
    fmt = path.suffix[1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise CLIError(f"-o: expected a file name ending in .png (or .{', .'.join(sorted(set(formats) - {'png'}))}),"
                       f" got {name!r}")
    if path.is_dir():
        raise CLIError(f"-o: {name!r} is a folder; expected a file name such as heat.png")
    if not path.parent.is_dir():
        raise CLIError(f"-o: folder {str(path.parent)!r} does not exist")
    return path, fmt


def _save(fig, path: Path, fmt: str) -> None:
    """Render in memory, then write atomically: a failure leaves no partial image."""
    import io

    from ..atomic import write_file_atomically

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=fmt, dpi=110)
        write_file_atomically(path, buf.getvalue())
    except OSError as exc:
        raise CLIError(f"-o: cannot write {str(path)!r} ({exc.strerror or exc})") from None


TITLE_POINTS = 9


def plot_affinity(maps, spec, subtitle: str = ""):
    """A matplotlib Figure (Agg canvas, no global pyplot state): one panel per map, shared log scale."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    panels = maps.panels()
    peak = max(float(a.max()) for _, a in panels)
    if peak <= 0:
        raise CLIError("the output pixel does not depend on the input at all (every map is zero)")
    arrays = [(name, a.numpy() / peak) for name, a in panels]
    positive = [float(a[a > 0].min()) for _, a in arrays if (a > 0).any()]
    vmin = max(min(positive), DYNAMIC_RANGE)
    norm = LogNorm(vmin=vmin, vmax=1.0)

    import matplotlib

    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#b8d4e8", under="black")
    n = len(arrays)
    fig = Figure(figsize=(3.1 * n + 1.2, 3.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    i, j = maps.pixel
    image = None
    for ax, (name, a) in zip(axes, arrays):
        shown = np.ma.masked_where(a == 0, a)  # exact zeros (no influence) get the "bad" colour
        image = ax.imshow(shown, norm=norm, cmap=cmap, interpolation="nearest")
        ax.plot([j], [i], marker="+", color="#00e5ff", markersize=11, markeredgewidth=2)
        title = DIRECTION_TITLES.get(name, "aggregate (merged output)" if name == "aggregate" else name)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    cbar = fig.colorbar(image, ax=list(axes), shrink=0.85, extend="min")
    cbar.set_label("|\u2202y[p]/\u2202x[q]| summed over channels / max")
    chunk = "global" if spec.chunk is None else f"chunk {spec.chunk}"
    text = (f"spec '{spec.name}': k={spec.connection}, normalization {spec.normalization}, {chunk}, "
            f"merge {spec.merge} \u2014 influence on output pixel p=({i},{j}) (+), normalised to the largest "
            f"value; light blue: exactly 0")
    # Wrap to the figure's width (about 0.6 em per character) so one panel's title is not cut off.
    width_chars = max(30, int(fig.get_figwidth() * 72 / (TITLE_POINTS * 0.6)) - 2)
    lines = textwrap.wrap(text, width_chars) + textwrap.wrap(subtitle, width_chars)
    fig.suptitle("\n".join(lines), fontsize=TITLE_POINTS)
    return fig
