"""gspngen show SPEC --stage spec|lowered|cuda|triton|cpu: print one stage of the compiler pipeline."""

from __future__ import annotations

import importlib

from ..cli import CLIError

STAGES = ("spec", "lowered", "cuda", "triton", "cpu")


def register(sub) -> None:
    p = sub.add_parser(
        "show",
        help="print a stage of the pipeline: the normalised spec, the lowered IR, or rendered sources",
        description="Print one compiler stage for a spec: 'spec' is the normalised YAML (defaults filled), "
                    "'lowered' the IR (directions with their axes and index maps, then every derived "
                    "per-pixel block as 'name = expr' lines), 'cuda'/'triton'/'cpu' the rendered kernel sources.",
    )
    p.add_argument("spec", metavar="SPEC", help="path to a YAML spec (see examples/)")
    p.add_argument("--stage", choices=STAGES, default="lowered", help="which stage to print (default: lowered)")
    p.set_defaults(func=run)


def format_ir(ir) -> str:
    """The lowered IR as readable text."""
    import sympy as sp

    from ..lower import C, print_block

    n, ch, t, i = sp.symbols("n ch t i", integer=True, nonnegative=True)
    spec = ir.spec
    lines = [
        f"# lowered IR of spec '{spec.name}' (hash {spec.hash[:12]})",
        f"connection k={ir.k} (radius r={ir.r}), normalization={ir.normalization}, "
        f"chunk={ir.chunk if ir.chunk is not None else 'global'}, modulation={str(ir.modulation).lower()}, "
        f"skip={str(ir.skip).lower()}, merge={ir.merge}, layout={ir.layout}, precision={list(ir.precision)}",
        "",
        "directions (offsets in elements of a per-pixel tensor with C channels; "
        "n batch, ch channel, t step in step order, i lane):",
    ]
    for d in ir.directions:
        ss, sl, sc, base = d.strides(C)
        L, T = d.extents()
        order = "reversed" if d.reverse else "forward"
        lines.append(f"  [{d.index}] {d.name}: steps along {d.step_axis} ({order}, T={T}), "
                     f"lanes along {d.lane_axis} (L={L})")
        lines.append(f"      stride_step={ss}  stride_lane={sl}  stride_channel={sc}  base_of_step0={base}")
        lines.append(f"      offset(n, ch, t, i) = {d.offset(n, ch, t, i, C)}")
    for name, block in ir.blocks.items():
        lines += ["", f"{name}: inputs {', '.join(block.inputs)} -> outputs {', '.join(block.outputs)} "
                      f"({block.count_ops()} ops)"]
        lines += ["  " + line for line in print_block(block, "text")]
    return "\n".join(lines) + "\n"


def render_sources(spec, stage: str) -> dict[str, str]:
    if stage not in spec.backends:
        raise CLIError(f"--stage {stage}: spec '{spec.name}' does not generate {stage} kernels "
                       f"(its backends field lists {list(spec.backends)})")
    missing = CLIError(f"--stage {stage}: the {stage} renderer (gspngen.render.{stage}.render_files) "
                       f"is not available in this gspngen")
    try:
        module = importlib.import_module(f"gspngen.render.{stage}")
    except ModuleNotFoundError as exc:
        if exc.name == f"gspngen.render.{stage}":
            raise missing from None
        raise CLIError(f"--stage {stage}: the {stage} renderer cannot be imported: {exc}") from None
    if not callable(getattr(module, "render_files", None)):
        raise missing
    return module.render_files(spec)


def run(args) -> int:
    from ..spec import load_spec

    spec = load_spec(args.spec)
    if args.stage == "spec":
        print(spec.to_yaml(), end="")
    elif args.stage == "lowered":
        from ..lower import lower

        print(format_ir(lower(spec)), end="")
    else:
        files = render_sources(spec, args.stage)  # everything rendered before anything is printed
        for name in sorted(files):
            comment = "#" if name.endswith((".py", ".pyi", ".txt", ".json")) or args.stage == "triton" else "//"
            print(f"{comment} ===== {name} =====")
            text = files[name]
            print(text, end="" if text.endswith("\n") else "\n")
    return 0
