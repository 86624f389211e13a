"""Affinity maps (gspngen.analysis) and the `gspngen heatmap` command."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gspngen
from gspngen.analysis import affinity
from gspngen.backends import backend_available
from gspngen.backends.reference import ReferenceBackend
from gspngen.cli import main
from gspngen.geometry import DIRECTION_TABLE
from gspngen.testing import make_inputs

CPU = torch.device("cpu")
# every backend that runs here (the reference always; lowered/triton once they exist)
BACKENDS = [b for b in ("reference", "lowered", "triton") if backend_available(b, CPU)]


def spec_of(**kw):
    return gspngen.Spec.from_dict({"name": "t", **kw})


def cone_mask(direction, k, chunk, H, W, p):
    """(H, W) bool: input pixels that can influence output pixel p through one direction (DESIGN §4)."""
    m = torch.zeros(H, W, dtype=torch.bool)
    d = DIRECTION_TABLE[direction]
    T = W if d.step_axis == "W" else H
    for qi in range(H):
        for qj in range(W):
            lane_p, lane_q, sp, sq = (p[0], qi, p[1], qj) if d.step_axis == "W" else (p[1], qj, p[0], qi)
            if d.reverse:  # position in step order
                sp, sq = T - 1 - sp, T - 1 - sq
            dt = sp - sq
            ok = dt >= 0 and abs(lane_p - lane_q) <= (k - 1) // 2 * dt
            if chunk is not None:
                ok = ok and sp // chunk == sq // chunk
            m[qi, qj] = ok
    return m


def test_lr_k3_global_cone_exact():
    spec = spec_of(connection=3, directions=["lr"])
    H, W, p = 7, 9, (3, 6)
    inputs = make_inputs(spec, 1, 2, H, W)
    maps = affinity(gspngen.compile(spec, "reference"), inputs, pixel=p)
    a = maps.per_direction["lr"]
    # the brief's statement of the cone: no input column right of p, |drow| <= dcol
    for qi in range(H):
        for qj in range(W):
            dcol, drow = p[1] - qj, qi - p[0]
            inside = dcol >= 0 and abs(drow) <= dcol
            assert (a[qi, qj] != 0) == inside, (qi, qj)
    # one direction, merge learned: the aggregate is the same map
    torch.testing.assert_close(maps.aggregate, a, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cone_through_backend(backend):
    spec = spec_of(connection=3, directions=["lr", "tb"], chunk=None, merge="sum")
    H, W, p = 6, 7, (2, 5)
    inputs = make_inputs(spec, 1, 2, H, W, dtype=torch.float32)  # a dtype every backend has kernels for
    maps = affinity(gspngen.compile(spec, backend), inputs, pixel=p)
    for name in spec.directions:
        assert torch.equal(maps.per_direction[name] != 0, cone_mask(name, 3, None, H, W, p)), name


@given(direction=st.sampled_from(["lr", "rl", "tb", "bt"]), k=st.sampled_from([1, 3, 5]),
       chunk=st.sampled_from([None, 1, 2, 3]), norm=st.sampled_from(["stability", "softmax"]),
       layout=st.sampled_from(["nchw", "nhwc"]), groups=st.sampled_from(["channel", "shared"]),
       H=st.integers(1, 6), W=st.integers(1, 6), data=st.data())
def test_cone_property(direction, k, chunk, norm, layout, groups, H, W, data):
    """Zero exactly outside the (chunked) cone of every direction, non-zero inside."""
    spec = spec_of(connection=k, directions=[direction], chunk=chunk, normalization=norm, layout=layout,
                   weight_groups=groups)
    p = (data.draw(st.integers(0, H - 1)), data.draw(st.integers(0, W - 1)))
    inputs = make_inputs(spec, 2, 2, H, W, seed=data.draw(st.integers(0, 99)))
    batch = data.draw(st.integers(0, 1))
    maps = affinity(gspngen.compile(spec, "reference"), inputs, pixel=p, batch=batch)
    expected = cone_mask(direction, k, chunk, H, W, p)
    assert torch.equal(maps.per_direction[direction] != 0, expected)
    assert torch.equal(maps.aggregate != 0, expected)


def test_chunk_stops_influence():
    spec = spec_of(directions=["lr"], chunk=3)
    H, W, p = 5, 9, (2, 4)  # column 4 lies in the chunk of columns 3..5
    maps = affinity(gspngen.compile(spec, "reference"), make_inputs(spec, 1, 2, H, W), pixel=p)
    a = maps.per_direction["lr"]
    assert (a[:, :3] == 0).all() and (a[:, 5:] == 0).all()
    assert (a[:, 3] != 0).sum() == 3 and a[2, 4] != 0  # inside the cone within the chunk


@pytest.mark.parametrize("pixel", [(0, 0), (3, 4), (6, 7), (0, 7)])
def test_four_direction_aggregate_dense(pixel):
    spec = spec_of(connection=3)  # four directions, global, learned merge
    maps = affinity(gspngen.compile(spec, "reference"), make_inputs(spec, 1, 2, 7, 8), pixel=pixel)
    assert (maps.aggregate > 0).all()
    # no single direction is dense; each is zero somewhere
    assert all((m == 0).any() for m in maps.per_direction.values())


@pytest.mark.parametrize("merge", ["sum", "mean", "learned", "stack"])
def test_merge_scaling_and_one_vjp_per_map(merge, monkeypatch):
    spec = spec_of(merge=merge)
    inputs = make_inputs(spec, 1, 2, 4, 5, seed=3)
    calls = []
    real = ReferenceBackend.backward
    monkeypatch.setattr(ReferenceBackend, "backward", lambda self, *a: calls.append(1) or real(self, *a))
    maps = affinity(gspngen.compile(spec, "reference"), inputs, pixel=(1, 2))
    assert len(calls) == spec.num_directions + 1  # one backward pass per map, no Jacobian
    alpha = {"sum": [1.0] * 4, "stack": [1.0] * 4, "mean": [0.25] * 4,
             "learned": inputs["m"].abs().tolist() if inputs["m"] is not None else None}[merge]
    single = gspngen.Spec.from_dict({**spec.to_dict(), "directions": ["lr"], "merge": "sum"})
    one = {k: (v[:, :1] if k in ("w", "lam", "u", "s") else v) for k, v in inputs.items() if k != "m"}
    ref = affinity(gspngen.compile(single, "reference"), one, pixel=(1, 2)).aggregate
    torch.testing.assert_close(maps.per_direction["lr"], alpha[0] * ref, rtol=1e-12, atol=0)
    # |sum| <= sum of |.|: the aggregate never exceeds the per-direction maps added up
    total = sum(maps.per_direction.values())
    assert (maps.aggregate <= total * (1 + 1e-12)).all()


def test_layer_callable_and_errors():
    conv = torch.nn.Conv2d(3, 3, 3, padding=1).double()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    maps = affinity(conv, x, pixel=(2, 3))
    assert maps.per_direction == {}
    nz = maps.aggregate != 0
    assert nz[1:4, 2:5].all() and nz.sum() == 9  # a 3x3 receptive field
    nhwc = affinity(lambda t: conv(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), x.permute(0, 2, 3, 1),
                    pixel=(2, 3), layout="nhwc")
    torch.testing.assert_close(nhwc.aggregate, maps.aggregate)
    op = gspngen.compile(spec_of(), "reference")
    with pytest.raises(ValueError, match="pixel"):
        affinity(op, make_inputs(op.spec, 1, 2, 4, 4), pixel=(4, 0))
    with pytest.raises(TypeError, match="inputs"):
        affinity(op, torch.zeros(1, 2, 4, 4), pixel=(0, 0))


def test_layer_with_directions_gspn2d():
    torch.manual_seed(0)
    spec = spec_of(directions=["lr", "bt"], layout="nhwc")
    layer = gspngen.nn.GSPN2d(6, spec, d_state=4, backend="reference").double()
    x = torch.randn(1, 5, 7, 6, dtype=torch.float64)
    maps = affinity(layer, x, pixel=(2, 4))
    assert set(maps.per_direction) == {"lr", "bt"}
    for name, a in maps.per_direction.items():
        cone = cone_mask(name, 3, None, 5, 7, (2, 4))
        assert (a[~cone] == 0).all() and a[2, 4] > 0, name
    assert ((maps.aggregate != 0) | ~(cone_mask("lr", 3, None, 5, 7, (2, 4))
                                      | cone_mask("bt", 3, None, 5, 7, (2, 4)))).all()


# -- the heatmap command ------------------------------------------------------

def test_plot_has_one_panel_per_direction_plus_aggregate():
    from gspngen.commands.heatmap import plot_affinity

    spec = spec_of(directions=["lr", "rl", "tb"])
    maps = affinity(gspngen.compile(spec, "reference"), make_inputs(spec, 1, 2, 6, 6), pixel=(3, 3))
    fig = plot_affinity(maps, spec, "test")
    image_axes = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 4
    assert len(fig.axes) == 5  # plus the colour bar
    assert "lr" in image_axes[0].get_title() and "aggregate" in image_axes[-1].get_title()
    assert "stability" in fig.get_suptitle() and "'t'" in fig.get_suptitle()


@pytest.mark.parametrize("dirs", [["lr"], ["lr", "tb"], ["lr", "rl", "tb"], ["lr", "rl", "tb", "bt"]])
def test_plot_title_fits_the_figure(dirs):
    # 1 panel (a single direction), up to 5 (four directions and the aggregate): the title is wrapped
    from gspngen.commands.heatmap import plot_affinity

    spec = spec_of(directions=dirs, chunk=4)
    maps = affinity(gspngen.compile(spec, "reference"), make_inputs(spec, 1, 2, 6, 6), pixel=(3, 3))
    fig = plot_affinity(maps, spec, "random inputs (seed 0), size 6x6")
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    box, page = fig._suptitle.get_window_extent(renderer), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and box.y1 <= page.y1, (box, page)


def test_heatmap_command_writes_png(tmp_path, capsys):
    import matplotlib.image as mpimg

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("name: demo\nconnection: 3\n")
    out = tmp_path / "h.png"
    assert main(["heatmap", str(spec_file), "--size", "10,12", "--pixel", "0,11", "-o", str(out)]) == 0
    assert "5 panels" in capsys.readouterr().out
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[1] > 3 * img.shape[0]  # five panels side by side
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std(axis=0).max() > 0.1 and len({tuple(c) for c in rgb[::7].tolist()}) > 50  # not blank


def test_heatmap_input_file(tmp_path, capsys):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("name: demo\ndirections: [lr, tb]\nlayout: nhwc\n")
    spec = gspngen.load_spec(spec_file)
    inputs = make_inputs(spec, 1, 2, 6, 5, dtype=torch.float32)
    good = tmp_path / "in.pt"
    torch.save({k: v for k, v in inputs.items() if v is not None}, good)
    out = tmp_path / "h.png"
    assert main(["heatmap", str(spec_file), "--input", str(good), "-o", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert main(["heatmap", str(spec_file), "--input", str(good), "--size", "5,5", "-o", str(out)]) == 2
    assert "--size" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"x": inputs["x"], "w": inputs["w"]}, bad)
    assert main(["heatmap", str(spec_file), "--input", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--input" in err and "lam" in err and len(err.strip().splitlines()) == 1
    assert main(["heatmap", str(spec_file), "--pixel", "40,0", "-o", str(out)]) == 2
    assert "--pixel" in capsys.readouterr().err


def test_heatmap_without_matplotlib(tmp_path, capsys, monkeypatch):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("name: demo\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["heatmap", str(spec_file), "-o", str(tmp_path / "h.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "matplotlib" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "h.png").exists()


@pytest.mark.parametrize("name,words", [
    ("h.foo", ["-o", "'h.foo'", "png"]),  # not an image format
    ("h", ["-o", "'h'", "png"]),  # matplotlib would silently write h.png
    ("missing/h.png", ["-o", "missing", "does not exist"]),
    ("folder", ["-o", "folder", "is a folder"]),
])
def test_heatmap_bad_output_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, name, words):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("name: demo\n")
    (tmp_path / "folder.png").mkdir()
    name = "folder.png" if name == "folder" else name
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gspngen.analysis, "affinity", None)  # must not get that far
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["heatmap", str(spec_file), "--size", "4,4", "-o", name]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for w in words:
        assert w in err, (w, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_heatmap_failed_write_leaves_nothing(tmp_path, capsys, monkeypatch):
    import os

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("name: demo\ndirections: [lr]\n")

    def fail(*args):  # the image is written to a temporary file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    assert main(["heatmap", str(spec_file), "--size", "4,4", "-o", str(tmp_path / "h.png")]) == 2
    assert "No space left" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


@pytest.mark.parametrize("seed", ["-1", str(2**64), "x"])
def test_heatmap_bad_seed_is_a_usage_error(tmp_path, capsys, seed):
    with pytest.raises(SystemExit) as info:
        main(["heatmap", "s.yaml", "--seed", seed, "-o", str(tmp_path / "h.png")])
    assert info.value.code == 2 and "--seed" in capsys.readouterr().err


def test_heatmap_file_gets_the_usual_permissions(tmp_path, capsys):
    """Written through a temporary file (mkstemp makes it 0600), yet readable like any new file."""
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("name: demo\ndirections: [lr]\n")
    (tmp_path / "plain").write_bytes(b"")
    out = tmp_path / "h.png"
    assert main(["heatmap", str(spec_file), "--size", "4,4", "-o", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
