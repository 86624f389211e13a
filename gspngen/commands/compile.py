"""gspngen compile SPEC [-o DIR]"""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "compile",
        help="render a spec's kernels into an importable package folder",
        description="Validate SPEC, render the kernel sources of every backend it lists, and write them with "
                    "manifest.json and an importable __init__.py (exposing `op`) into DIR. The output is "
                    "deterministic and written atomically. An existing DIR is replaced only if it is empty or "
                    "an earlier gspngen output (it holds manifest.json).",
    )
    p.add_argument("spec", metavar="SPEC", help="path to a YAML spec (see examples/)")
    p.add_argument("-o", "--output", metavar="DIR", default=None,
                   help="output folder (default: generated/<name>); replaced only if empty or an earlier output")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..cli import CLIError
    from ..codegen import write_package
    from ..spec import load_spec

    spec = load_spec(args.spec)
    out = Path(args.output) if args.output else Path("generated") / spec.name
    try:
        write_package(spec, out)
    except OSError as exc:  # refused, or the disk said no: one line, nothing left behind
        detail = f"{exc.strerror}: {exc.filename}" if exc.strerror else str(exc)
        raise CLIError(f"-o {out}: cannot write the package ({detail})") from None
    files = sorted(q.name for q in out.iterdir())
    print(f"compiled spec '{spec.name}' (sha256 {spec.hash[:16]}) -> {out}/: {', '.join(files)}")
    return 0
