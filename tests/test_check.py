"""`gspngen check`: passes on the examples, fails (exit 1, row named) on a broken backend, exit 2 on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gspngen
import gspngen.api
import gspngen.check
import gspngen.ops
from gspngen.backends import get_backend
from gspngen.backends.reference import ReferenceBackend
from gspngen.check import poison_missing_neighbours, run_checks
from gspngen.cli import main
from gspngen.testing import make_inputs

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_check_passes_on_examples(path, capsys):
    spec = gspngen.load_spec(path)
    C = gspngen.check.small_channels(spec)
    assert main(["check", str(path), "--shape", f"1,{C},4,9"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "OK: all" in out and "FAIL" not in out
    for row in ("stability", "connectivity", "forward", "grad x", "grad w", "grad lam", "gradcheck fp64"):
        assert row in out


class _Broken(ReferenceBackend):
    """The reference with one deliberate bug."""

    def __init__(self, bug: str):
        self.bug = bug

    def forward(self, spec, x, w, lam, u, s, m):
        y, saved = super().forward(spec, x, w, lam, u, s, m)
        if self.bug == "forward":
            y = y + 1e-3 * y.abs().max()
        if self.bug == "unwritten":
            y = y.clone()
            y.view(-1)[-1] = torch.empty((), dtype=y.dtype)  # a kernel that forgets one element
        return y, saved

    def backward(self, spec, gy, x, w, lam, u, s, m, saved):
        grads = list(super().backward(spec, gy, x, w, lam, u, s, m, saved))
        if self.bug == "grad w":
            grads[1] = grads[1] * 1.01
        return tuple(grads)


@pytest.fixture
def break_lowered(monkeypatch):
    """Make the backend named 'lowered' a broken copy of the reference."""

    def install(bug: str):
        broken = _Broken(bug)

        def fake(name):
            return broken if name == "lowered" else get_backend(name)

        for module in (gspngen.ops, gspngen.api, gspngen.check):
            monkeypatch.setattr(module, "get_backend", fake)

    return install


@pytest.mark.parametrize("bug, failing", [("forward", "forward"), ("grad w", "grad w"), ("unwritten", "forward")])
def test_check_fails_on_broken_backend(bug, failing, break_lowered, capsys):
    break_lowered(bug)
    path = str(EXAMPLES[0])
    assert main(["check", path, "--backend", "lowered", "--shape", "1,4,4,5"]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(failing) and " lowered " in line)
    assert "FAIL" in row
    assert f"{failing} [lowered]" in out.splitlines()[-1]  # the summary names the failing row
    reference_rows = [line for line in out.splitlines() if " reference " in line]
    assert reference_rows and not any("FAIL" in line for line in reference_rows)


def test_rows_na_and_skipped():
    spec = gspngen.Spec.from_dict({"name": "t", "directions": ["lr", "tb"], "normalization": "none",
                                   "backends": []})
    rows = run_checks(spec, backends=["reference", "triton"], shape=(1, 2, 3, 4), dtype=torch.float64)
    by = {(r.check, r.backend): r for r in rows}
    assert by[("stability", "reference")].status == "n/a"
    assert by[("connectivity", "reference")].status == "n/a"
    assert by[("backend", "triton")].status == "skipped"
    assert "spec's backends" in by[("backend", "triton")].note
    assert by[("forward", "reference")].status == "PASS"
    assert not any(r.failed for r in rows)


def test_k1_four_directions_not_dense():
    spec = gspngen.Spec.from_dict({"name": "t", "connection": 1})
    row = gspngen.check.check_connectivity(spec, (1, 2, 4, 4), 0)
    assert row.status == "n/a" and "k = 1" in row.note


def test_connectivity_detects_a_gap(monkeypatch):
    # a "reference" that drops the tb direction's propagation leaves pixel pairs unconnected
    spec = gspngen.Spec.from_dict({"name": "t"})
    real = gspngen.backends.reference.scan_direction

    def no_tb(spec_, direction, x, w, lam):
        h = real(spec_, direction, x, w, lam)
        return h * 0 + lam * x if direction == "tb" else h

    monkeypatch.setattr(gspngen.backends.reference, "scan_direction", no_tb)
    row = gspngen.check.check_connectivity(spec, (1, 2, 5, 5), 0)
    assert row.status == "FAIL" and "unconnected" in row.note


def test_poison_marks_exactly_the_missing_neighbours():
    spec = gspngen.Spec.from_dict({"name": "t", "connection": 5, "layout": "nhwc"})
    H, W = 4, 6
    w = make_inputs(spec, 1, 2, H, W)["w"]
    p = poison_missing_neighbours(spec, w)
    # per direction: lanes L, steps T; missing neighbours per line = 2 * (1 + 2) for r = 2
    per_dir = [6 * (W if d in ("lr", "rl") else H) for d in spec.directions]
    G = 2
    assert int(torch.isnan(p).sum()) == G * sum(per_dir)
    kept = ~torch.isnan(p)
    assert torch.equal(p[kept], w[kept])


def test_bad_arguments_exit_2(tmp_path, capsys):
    path = str(EXAMPLES[0])
    assert main(["check", path, "--shape", "1,4,4"]) == 2
    assert "--shape" in capsys.readouterr().err
    assert main(["check", path, "--backend", "nope"]) == 2
    assert "--backend" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nconnection: 4\n")
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "connection" in err and len(err.splitlines()) == 1
    wide = str(next(p for p in EXAMPLES if p.stem == "wide5"))
    assert main(["check", wide, "--shape", "1,6,4,4"]) == 2  # weight_groups 4 does not divide 6
    assert "--shape" in capsys.readouterr().err


def test_gradcheck_row_detects_a_wrong_gradient(monkeypatch):
    real = ReferenceBackend.backward

    def off(self, *args):
        grads = list(real(self, *args))
        grads[2] = grads[2] * 1.001  # d/dlam 0.1 % off
        return tuple(grads)

    spec = gspngen.Spec.from_dict({"name": "t"})
    assert gspngen.check.check_gradcheck(spec, 0).status == "PASS"
    monkeypatch.setattr(ReferenceBackend, "backward", off)
    row = gspngen.check.check_gradcheck(spec, 0)
    assert row.status == "FAIL" and "input 2" in row.note


def test_bad_seed_is_a_usage_error_not_failed_checks(capsys):
    with pytest.raises(SystemExit) as info:
        main(["check", str(EXAMPLES[0]), "--seed", str(2**70)])
    assert info.value.code == 2 and "--seed" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["meta", "foo"])
def test_bad_device_is_a_one_line_error(capsys, device):
    assert main(["check", str(EXAMPLES[0]), "--device", device]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("chunk", [None, 1, 8, 16, 40, 1000])
def test_default_shape_crosses_a_chunk_boundary_or_says_so(chunk):
    spec = gspngen.Spec.from_dict({"name": "t", "chunk": chunk})
    N, C, H, W = gspngen.check.default_shape(spec)
    assert H != W and max(H, W) < gspngen.check.MAX_DEFAULT_SIDE + 1
    note = gspngen.check.chunk_note(spec, (N, C, H, W))
    if chunk is None or chunk < min(H, W):
        assert note is None
    else:
        assert chunk == 1000 and "crosses no chunk boundary" in note.replace("cross no", "crosses no")


def test_non_finite_result_is_a_failure_with_its_index(monkeypatch):
    # a backend that puts one inf into an otherwise correct result: FAIL, naming where
    from gspngen.backends.lowered import LoweredBackend

    real = LoweredBackend.forward

    def one_inf(self, spec, *args):
        y, saved = real(self, spec, *args)
        y = y.clone()
        y.view(-1)[3] = float("inf")
        return y, saved

    monkeypatch.setattr(LoweredBackend, "forward", one_inf)
    spec = gspngen.Spec.from_dict({"name": "t", "directions": ["lr"]})
    rows = gspngen.check.check_backend(spec, "lowered", (1, 2, 3, 4), torch.float64, torch.device("cpu"), 0)
    fwd = next(r for r in rows if r.check == "forward")
    assert fwd.status == "FAIL" and "non-finite inf at index" in fwd.note
