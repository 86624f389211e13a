"""gspngen.nn.GSPN2d: shapes in both layouts, gradients to every parameter, per-direction outputs."""

from __future__ import annotations

import pytest
import torch

import gspngen
from gspngen.nn import GSPN2d


def spec_of(**kw):
    return gspngen.Spec.from_dict({"name": "t", **kw})


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("merge", ["learned", "stack", "mean"])
def test_shapes_and_gradients(layout, merge):
    torch.manual_seed(0)
    spec = spec_of(layout=layout, merge=merge, weight_groups=2)
    layer = GSPN2d(6, spec, d_state=4, backend="reference")
    shape = (2, 6, 5, 7) if layout == "nchw" else (2, 5, 7, 6)
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == shape and y.dtype == x.dtype
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    names = {n for n, _ in layer.named_parameters()}
    assert ("merge_weights" in names) == (merge == "learned")
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_layout_is_respected():
    # the same weights on the same data in both layouts give the same result, transposed
    torch.manual_seed(1)
    a = GSPN2d(5, spec_of(layout="nchw"), d_state=3, backend="reference").double()
    b = GSPN2d(5, spec_of(layout="nhwc"), d_state=3, backend="reference").double()
    with torch.no_grad():
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert na == nb
            pb.copy_(pa.reshape(pb.shape))  # 1x1 conv (out, in, 1, 1) -> linear (out, in)
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(b(x.permute(0, 2, 3, 1)), a(x).permute(0, 2, 3, 1))


def test_direction_outputs_add_up():
    torch.manual_seed(2)
    layer = GSPN2d(4, spec_of(merge="learned"), d_state=4, backend="reference").double()
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    parts = [layer.forward_direction(x, d) for d in layer.directions]
    bias = layer.out.bias.view(1, -1, 1, 1)
    # the output projection is affine: each part carries its bias once
    torch.testing.assert_close(sum(parts) - (len(parts) - 1) * bias, layer(x))
    with pytest.raises(ValueError, match="direction"):
        layer.forward_direction(x, "diagonal")


def test_bad_arguments():
    with pytest.raises(ValueError, match="d_state"):
        GSPN2d(8, spec_of(weight_groups=4), d_state=6)
    with pytest.raises(ValueError, match="dim"):
        GSPN2d(0, spec_of())
    layer = GSPN2d(8, spec_of(), backend="reference")
    assert layer.d_state == 8 and "d_state=8" in repr(layer)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(1, 8, 4))  # not 4-d
    with pytest.raises(ValueError, match=r"\(N, 8, H, W\)"):
        layer(torch.randn(1, 4, 4, 8))  # channels last for an nchw spec


def test_backend_auto_and_yaml_path(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: from_file\ndirections: [lr, rl]\nmerge: sum\n")
    layer = GSPN2d(3, str(path))
    assert layer.spec.name == "from_file" and layer.op.backend == "auto"
    assert layer(torch.randn(1, 3, 4, 4)).shape == (1, 3, 4, 4)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_runs_under_autocast(layout):
    """Under autocast the 1x1 heads give bf16 while the merge weights stay an fp32 Parameter."""
    torch.manual_seed(3)
    layer = GSPN2d(6, spec_of(layout=layout), d_state=4, backend="reference")
    x = torch.randn((1, 6, 3, 4) if layout == "nchw" else (1, 3, 4, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert layer.forward_direction(x, "tb").shape == x.shape
    y.float().sum().backward()
    assert y.shape == x.shape and layer.merge_weights.grad is not None
    assert layer.merge_weights.grad.dtype == torch.float32
    # Accuracy is checked elsewhere: tests/test_models.py compares the layer with an independent
    # composition at fp64, and its autocast test checks the dtypes the op sees.
