"""The per-device tuning cache file: concurrent writers, corrupt files, unwritable folders, schemas,
export and import."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import warnings
from pathlib import Path

import pytest
import torch

import gspngen
from gspngen.api import default_backend
from gspngen.testing import make_inputs
from gspngen.tune import cache as tcache
from gspngen.tune import lookup
from gspngen.tune.device import device_id, identity
from gspngen.tune.replay import replay
from gspngen.tune.tuner import tune

ROOT = Path(__file__).resolve().parents[1]
GSPN4 = ROOT / "examples" / "gspn4.yaml"
SHAPE = (1, 4, 8, 8)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GSPNGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GSPNGEN_AUTOTUNE", raising=False)
    tcache.reset_memory()
    lookup.forget()
    yield tmp_path / "cache"
    tcache.reset_memory()
    lookup.forget()


def cpu_table_path() -> Path:
    return tcache.path_for(device_id(identity("cpu")))


def entry(name: str, ms: float = 1.0) -> dict:
    return {"key": {"spec": name, "pass": "fwd"}, "shape": [1, 1, 1, 1], "default": "reference", "date": "d",
            "candidates": {"reference": {"backend": "reference", "config": "", "status": "ok", "median_ms": ms}}}


def lowered_wins():
    replay({"spec": str(GSPN4), "device": "cpu", "runs": [
        {"shape": list(SHAPE), "dtype": "fp32", "pass": "fwd",
         "candidates": {"lowered": {"median_ms": 1.0}, "reference": {"median_ms": 2.0}}}]})


def run_op():
    spec = gspngen.load_spec(GSPN4)
    inp = make_inputs(spec, *SHAPE, dtype=torch.float32)
    op = gspngen.compile(spec)
    return op, op(*[inp[k] for k in ("x", "w", "lam", "u", "s", "m")]), inp["x"]


def _writer(i: int, folder: str, ident: dict, did: str) -> None:
    os.environ["GSPNGEN_CACHE_DIR"] = folder
    for round_ in range(5):  # several writes each: the merges interleave
        tcache.write_entries(tcache.path_for(did), ident, did, {f"key-{i}": entry(f"spec-{i}", round_ + 1.0)})


def test_eight_processes_writing_at_once_lose_nothing(cache_dir):
    ident = identity("cpu")
    did = device_id(ident)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(i, str(cache_dir), ident, did)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    table = json.loads(tcache.path_for(did).read_text())
    assert sorted(table["entries"]) == sorted(f"key-{i}" for i in range(8))
    assert all(e["candidates"]["reference"]["median_ms"] == 5.0 for e in table["entries"].values())
    assert not list(cache_dir.rglob("*.tmp"))  # no temporary file left behind


@pytest.mark.parametrize("garbage", [b"truncated", b"random"])
def test_corrupt_file_is_moved_aside_with_one_warning_and_the_op_runs(garbage, cache_dir):
    lowered_wins()
    path = cpu_table_path()
    text = path.read_bytes()
    path.write_bytes(text[: len(text) // 2] if garbage == b"truncated" else os.urandom(4096))
    tcache.reset_memory()
    lookup.forget()
    with pytest.warns(tcache.CacheWarning, match="moved aside") as record:
        op, y, x = run_op()
        gspngen.compile(GSPN4).resolve_backend(x)  # a second op: no second warning
    assert len([w for w in record if issubclass(w.category, tcache.CacheWarning)]) == 1
    assert torch.isfinite(y).all()
    assert op.resolve_backend(x) == default_backend(gspngen.load_spec(GSPN4), "cpu", torch.float32)  # the default, until tuned again
    assert len(list(path.parent.glob(path.name + ".corrupt-*"))) == 1
    lowered_wins()  # and the next tuning writes a fresh, valid table
    assert json.loads(path.read_text())["schema"] == tcache.SCHEMA


def test_file_of_another_schema_is_ignored_with_one_warning(cache_dir):
    path = cpu_table_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"kind": tcache.KIND, "schema": 999, "anything": []}))
    with pytest.warns(tcache.CacheWarning, match="schema 999") as record:
        op, y, x = run_op()
        gspngen.compile(GSPN4).resolve_backend(x)
    assert len([w for w in record if issubclass(w.category, tcache.CacheWarning)]) == 1
    assert op.resolve_backend(x) == default_backend(gspngen.load_spec(GSPN4), "cpu", torch.float32)


@pytest.mark.parametrize("how", ["not-a-folder", "enospc"])
def test_unwritable_cache_tunes_in_memory_with_one_warning(how, cache_dir, tmp_path, monkeypatch):
    if how == "not-a-folder":  # tests run as root, where chmod does not stop writes: a path under a file
        blocker = tmp_path / "blocker"
        blocker.write_text("a file, not a folder")
        monkeypatch.setenv("GSPNGEN_CACHE_DIR", str(blocker / "cache"))
    else:
        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        from gspngen import atomic

        monkeypatch.setattr(atomic, "write_file_atomically", full)
    tcache.reset_memory()
    spec = gspngen.load_spec(GSPN4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = tune(spec, SHAPE, "fp32", passes=["fwd"], budget_s=0.02, backends=["reference", "lowered"])
        report = tune(spec, SHAPE, "fp32", passes=["fwd"], budget_s=0.02, backends=["reference", "lowered"])
        op, y, x = run_op()
    assert first["stored"] is False
    # (two timings of near-equal candidates may pick different winners: the latest one is in memory)
    cache_warnings = [w for w in record if issubclass(w.category, tcache.CacheWarning)]
    assert report["stored"] is False
    assert len(cache_warnings) == 1 and "cannot be written" in str(cache_warnings[0].message), \
        [str(w.message) for w in cache_warnings]
    winner = report["entries"][report["keys"]["fwd"]]["winner"]
    assert op.resolve_backend(x) == winner  # the in-memory result is used
    assert torch.isfinite(y).all()


def test_export_import_round_trip_and_refusals(tmp_path, capsys, monkeypatch, cache_dir):
    from gspngen.cli import main

    lowered_wins()
    exported = tmp_path / "table.json"
    assert main(["cache", "export", str(exported)]) == 0
    assert main(["cache", "clear"]) == 0
    assert not cpu_table_path().exists()
    assert main(["cache", "import", str(exported)]) == 0
    assert "imported 1 entries" in capsys.readouterr().out
    assert len(json.loads(cpu_table_path().read_text())["entries"]) == 1
    _, _, x = run_op()
    assert gspngen.compile(GSPN4).resolve_backend(x) == "lowered"

    other = json.loads(exported.read_text())
    other["device"] = {**other["device"], "name": "Some Other CPU"}
    (tmp_path / "other.json").write_text(json.dumps(other))
    old = {**other, "schema": 0}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "junk.json").write_text("{not json")
    for name, why in (("other.json", "another device"), ("old.json", "schema 0"), ("junk.json", "not valid JSON")):
        assert main(["cache", "import", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err, err


def test_cache_path_and_list(capsys, cache_dir):
    from gspngen.cli import main

    assert main(["cache", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(cpu_table_path())
    assert main(["cache", "list"]) == 0
    assert "no tuning tables" in capsys.readouterr().out
    lowered_wins()
    assert main(["cache", "list"]) == 0
    assert "1 entries" in capsys.readouterr().out
    assert main(["cache", "clear", "--all"]) == 0
    assert "removed 1 table" in capsys.readouterr().out
