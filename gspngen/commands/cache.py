"""gspngen cache path|list|show|clear|export FILE|import FILE: the per-device tuning tables."""

from __future__ import annotations

from pathlib import Path

ACTIONS = ("path", "list", "show", "clear", "export", "import")


def register(sub) -> None:
    p = sub.add_parser(
        "cache",
        help="inspect, clear, export or import the per-device autotuning tables",
        description="The autotuner keeps one JSON table per device in $GSPNGEN_CACHE_DIR/autotune (default "
                    "$XDG_CACHE_HOME/gspngen, else ~/.cache/gspngen). path: this device's table; list: every "
                    "table in the folder; show: this device's entries; clear: delete this device's table "
                    "(--all: every table); export FILE: copy this device's table to FILE; import FILE: merge a "
                    "table exported on an identical device (same GPU or CPU model; tune once, ship to a "
                    "cluster). A table of another device or schema is refused.",
    )
    p.add_argument("action", metavar="ACTION", help=" | ".join(ACTIONS))
    p.add_argument("file", metavar="FILE", nargs="?", default=None, help="for export and import")
    p.add_argument("--device", metavar="DEV", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--all", action="store_true", help="clear: every table in the folder, not only this device's")
    p.set_defaults(func=run)


def _device(name):
    import torch

    from ..cli import CLIError

    if name is not None and name not in ("cuda", "cpu"):
        raise CLIError(f"--device: expected cuda or cpu, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device: cuda requested but no CUDA device is available here")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _num(v) -> str:
    return "-" if v is None else (f"{v:.3g}" if v < 100 else f"{v:.0f}")


def run(args) -> int:
    import json

    from ..cli import CLIError
    from ..tune.cache import SCHEMA, path_for, read_table, table_problem, tune_dir, write_entries
    from ..tune.device import device_id, identity

    if args.action not in ACTIONS:
        raise CLIError(f"ACTION: expected one of {', '.join(ACTIONS)}, got {args.action!r}")
    needs_file = args.action in ("export", "import")
    if needs_file and args.file is None:
        raise CLIError(f"FILE: '{args.action}' needs a file name")
    if not needs_file and args.file is not None:
        raise CLIError(f"FILE: '{args.action}' takes no file, got {args.file!r}")
    if args.all and args.action != "clear":
        raise CLIError("--all: only with clear")

    if args.action == "list":
        folder = tune_dir()
        files = sorted(folder.glob("*.json")) if folder.is_dir() else []
        if not files:
            print(f"no tuning tables in {folder}")
        for f in files:
            try:
                data = json.loads(f.read_text())
                problem = table_problem(data)
            except (OSError, ValueError) as exc:
                data, problem = None, f"unreadable: {exc}"
            if problem is None and data.get("schema") != SCHEMA:
                problem = f"schema {data.get('schema')} (this gspngen reads {SCHEMA})"
            desc = problem or f"{data['device'].get('name')}, {len(data['entries'])} entries"
            print(f"{f}  {desc}")
        return 0

    device = _device(args.device)
    ident = identity(device)
    did = device_id(ident)
    path = path_for(did)
    if args.action == "path":
        print(path)
        return 0
    if args.action == "clear":
        targets = sorted(tune_dir().glob("*.json*")) if args.all else [path, Path(str(path) + ".lock")]
        removed = 0
        for f in targets:
            try:
                f.unlink()
                removed += f.suffix == ".json"
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise CLIError(f"clear: cannot remove {f} ({exc.strerror or exc})") from None
        print(f"removed {removed} table(s) from {tune_dir()}")
        from ..tune.lookup import forget

        forget()
        return 0
    if args.action == "show":
        table = read_table(path, ident, did)
        print(f"{path}\ndevice: {ident.get('name')} ({did}), schema {SCHEMA}, {len(table['entries'])} entries")
        if not table["entries"]:
            return 0
        head = ["spec", "dtype", "pass", "bucket", "shape", "winner", "ms", "default", "ms ", "ok/rej", "date"]
        rows = [head]
        for key, e in sorted(table["entries"].items(), key=lambda kv: (kv[1]["key"].get("spec_name", ""), kv[0])):
            k, cands = e["key"], e["candidates"]
            win, dflt = cands.get(e.get("winner") or ""), cands.get(e.get("default") or "")
            ok = sum(c["status"] == "ok" for c in cands.values())
            rows.append([f"{k.get('spec_name')}:{k.get('spec', '')[:8]}", k.get("dtype", "?"), k.get("pass", "?"),
                         k.get("bucket", "?"), ",".join(map(str, e.get("shape", []))), e.get("winner") or "none",
                         _num(win.get("median_ms") if win else None), e.get("default") or "-",
                         _num(dflt.get("median_ms") if dflt else None), f"{ok}/{len(cands) - ok}",
                         str(e.get("date", ""))[:19]])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for i, r in enumerate(rows):
            print("  ".join(c.ljust(widths[j]) for j, c in enumerate(r)).rstrip())
            if i == 0:
                print("  ".join("-" * w for w in widths))
        return 0
    if args.action == "export":
        from ..atomic import write_file_atomically

        table = read_table(path, ident, did)
        if not table["entries"]:
            raise CLIError(f"export: no tuned entries for this device yet ({path}); run gspngen autotune first")
        dest = Path(args.file)
        if dest.is_dir() or not dest.parent.is_dir():
            raise CLIError(f"FILE: expected a file name in an existing folder, got {args.file!r}")
        write_file_atomically(dest, (json.dumps(table, indent=1, sort_keys=True) + "\n").encode())
        print(f"exported {len(table['entries'])} entries to {dest}")
        return 0
    # import
    src = Path(args.file)
    try:
        data = json.loads(src.read_text())
    except OSError as exc:
        raise CLIError(f"import: cannot read {args.file!r} ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise CLIError(f"import: {args.file!r} is not valid JSON ({exc})") from None
    problem = table_problem(data)
    if problem is not None:
        raise CLIError(f"import: {args.file!r} is {problem}")
    if data["schema"] != SCHEMA:
        raise CLIError(f"import: {args.file!r} has schema {data['schema']}, this gspngen reads schema {SCHEMA}")
    if data["device"] != ident:
        raise CLIError(f"import: {args.file!r} was tuned on another device ({data['device_id']}), "
                       f"this one is {did}")
    try:
        write_entries(path, ident, did, data["entries"])
    except OSError as exc:
        raise CLIError(f"import: cannot write {path} ({exc.strerror or exc})") from None
    from ..tune.lookup import forget

    forget()
    print(f"imported {len(data['entries'])} entries into {path}")
    return 0
