"""Tensor validation (DESIGN §7): every error names the argument, the expected and the actual value."""

import pytest
import torch

import gspngen
from gspngen.testing import make_inputs

SPEC = gspngen.Spec.from_dict({"name": "t", "weight_groups": 2})
NHWC = gspngen.Spec.from_dict({"name": "t", "layout": "nhwc"})


def good(spec=SPEC):
    return make_inputs(spec, 1, 4, 3, 5, dtype=torch.float32)


def call(spec=SPEC, **over):
    inp = {**good(spec), **over}
    return gspngen.compile(spec, backend="reference")(**inp)


@pytest.mark.parametrize("over,exc,words", [
    ({"x": "tensor"}, TypeError, ["x", "torch.Tensor", "str"]),
    ({"x": torch.zeros(1, 4, 3, 5, dtype=torch.int32)}, TypeError, ["x", "floating", "int32"]),
    ({"x": torch.zeros(4, 3, 5)}, ValueError, ["x", "4-d", "(4, 3, 5)"]),
    ({"w": torch.zeros(1, 4, 3, 4, 3, 5)}, ValueError, ["w", "(1, 4, 3, 2, 3, 5)", "(1, 4, 3, 4, 3, 5)"]),
    ({"lam": torch.zeros(1, 3, 4, 3, 5)}, ValueError, ["lam", "(1, 4, 4, 3, 5)", "(1, 3, 4, 3, 5)"]),
    ({"u": None}, ValueError, ["u", "modulation", "None"]),
    ({"s": None}, ValueError, ["s", "skip", "None"]),
    ({"m": None}, ValueError, ["m", "learned", "None"]),
    ({"m": torch.zeros(3)}, ValueError, ["m", "(4,)", "(3,)"]),
    ({"lam": torch.zeros(1, 4, 4, 3, 5, dtype=torch.float64)}, TypeError, ["lam", "float32", "float64"]),
    ({"u": torch.zeros(1, 4, 4, 3, 5, device="meta")}, ValueError, ["u", "device", "meta"]),
])
def test_bad_tensor_errors(over, exc, words):
    with pytest.raises(exc) as info:
        call(**over)
    msg = str(info.value)
    for word in words:
        assert word in msg, (word, msg)


def test_groups_must_divide_channels():
    inp = make_inputs(SPEC, 1, 4, 3, 5, dtype=torch.float32)
    x = torch.zeros(1, 3, 3, 5)
    with pytest.raises(ValueError, match=r"x: weight_groups=2 must divide the channel count, got C=3"):
        gspngen.compile(SPEC, backend="reference")(**{**inp, "x": x})


def test_unexpected_optional_argument():
    spec = gspngen.Spec.from_dict({"name": "t", "modulation": False, "skip": False, "merge": "sum"})
    inp = make_inputs(spec, 1, 2, 3, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"u: not used by this spec \(modulation: false\)"):
        gspngen.compile(spec, backend="reference")(**{**inp, "u": torch.zeros(1, 4, 2, 3, 3)})
    with pytest.raises(ValueError, match=r"m: not used by this spec \(merge: sum\), expected None"):
        gspngen.compile(spec, backend="reference")(**{**inp, "m": torch.zeros(4)})


def test_nhwc_shapes():
    inp = good(NHWC)
    assert inp["x"].shape == (1, 3, 5, 4) and inp["w"].shape == (1, 4, 3, 3, 5, 4)
    assert call(NHWC).shape == (1, 3, 5, 4)
    with pytest.raises(ValueError, match=r"lam: expected shape \(1, 4, 3, 5, 4\)"):
        call(NHWC, lam=torch.zeros(1, 4, 4, 3, 5))


def test_backend_choices():
    with pytest.raises(ValueError, match="backend: expected auto or one of"):
        gspngen.compile(SPEC, backend="opencl")
    spec = gspngen.Spec.from_dict({"name": "t", "backends": ["triton"]})
    with pytest.raises(ValueError, match="backend: 'cuda' is not generated for spec 't'"):
        gspngen.compile(spec, backend="cuda")
    # auto on CPU runs the generated C++ kernels when the spec lists cpu and a compiler is
    # there (fp32 and fp64 always), else the reference, for any floating dtype
    from gspngen.backends import backend_available

    op = gspngen.compile(SPEC)
    expected = "cpu" if "cpu" in SPEC.backends and backend_available("cpu", torch.device("cpu")) else "reference"
    assert op.resolve_backend(torch.zeros(1)) == expected
    assert op.resolve_backend(torch.zeros(1, dtype=torch.float64)) == expected
    no_cpu = gspngen.compile(gspngen.Spec.from_dict({"name": "t", "backends": ["cuda", "triton"]}))
    assert no_cpu.resolve_backend(torch.zeros(1)) == "reference"
    assert no_cpu.resolve_backend(torch.zeros(1, dtype=torch.float64)) == "reference"


def test_compile_accepts_mapping_and_path(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: t\nconnection: 5\n")
    assert gspngen.compile(p).spec.connection == 5
    assert gspngen.compile({"name": "t"}).spec.connection == 3
    with pytest.raises(TypeError, match="spec: expected"):
        gspngen.compile(42)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64])
def test_dtypes_torch_cannot_compute_with_are_rejected_up_front(dtype):
    inp = {k: (v.to(dtype) if v is not None else None) for k, v in good().items()}
    with pytest.raises(TypeError, match=rf"x: expected .*float16, bfloat16, float32 or float64.*got {dtype}"):
        gspngen.compile(SPEC, backend="reference")(**inp)


@pytest.mark.parametrize("name", ["x", "w", "m"])
def test_sparse_tensors_are_rejected_up_front(name):
    with pytest.raises(TypeError, match=rf"{name}: expected a dense \(strided\) tensor, got torch.sparse_coo"):
        call(**{name: good()[name].to_sparse()})


def _op_args(spec=SPEC, backend="lowered", **over):
    inp = {**good(spec), **over}
    return (*(inp[k] for k in ("x", "w", "lam", "u", "s", "m")), spec.to_json(), backend)


def test_custom_op_called_directly_validates_its_inputs():
    """torch.ops.gspngen.scan is public: a bad call is an error naming the argument, never a bad access."""
    with pytest.raises(ValueError, match=r"lam: expected shape \(1, 4, 4, 3, 5\), got \(1, 4, 4, 3, 4\)"):
        torch.ops.gspngen.scan(*_op_args(lam=torch.zeros(1, 4, 4, 3, 4)))
    x = torch.zeros(1, 5, 3, 4).permute(0, 3, 2, 1)[:, :, :, :5]  # right shape, not contiguous
    with pytest.raises(ValueError, match=r"x: expected a contiguous tensor"):
        torch.ops.gspngen.scan(*_op_args(x=x))


def test_custom_backward_op_called_directly_validates_its_inputs():
    args = _op_args(backend="lowered")
    y, saved = torch.ops.gspngen.scan(*args)
    x, w, lam, u, s, m, spec_json, backend = args
    with pytest.raises(ValueError, match=r"gy: expected shape \(1, 4, 3, 5\) \(the result's\), got \(1, 4, 3, 4\)"):
        torch.ops.gspngen.scan_backward(y[..., :4].contiguous(), x, w, lam, u, s, m, saved, spec_json, backend)
    with pytest.raises(ValueError, match=r"saved: expected shape \(1, 4, 4, 3, 5\) and dtype torch.float32"):
        torch.ops.gspngen.scan_backward(y, x, w, lam, u, s, m, saved[:, :2].contiguous(), spec_json, backend)
    grads = torch.ops.gspngen.scan_backward(y, x, w, lam, u, s, m, saved, spec_json, backend)
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in (x, w, lam, u, s, m)]


@pytest.mark.parametrize("spec_layout,given_layout", [("nhwc", "nchw"), ("nchw", "nhwc")])
def test_layout_mixup_names_x_and_the_other_layout(spec_layout, given_layout):
    spec = gspngen.Spec.from_dict({"name": "t", "layout": spec_layout, "weight_groups": 4})
    other = gspngen.Spec.from_dict({"name": "t", "layout": given_layout, "weight_groups": 4})
    op = gspngen.compile(spec, backend="reference")
    with pytest.raises(ValueError) as info:
        op(**make_inputs(other, 2, 16, 12, 5))
    msg = str(info.value)
    assert msg.startswith("x: the tensors look") and f"use a spec with layout: {given_layout}" in msg


def test_plain_shape_error_is_unchanged_when_no_layout_fits():
    spec = gspngen.Spec.from_dict({"name": "t", "layout": "nhwc"})
    inputs = make_inputs(spec, 2, 3, 4, 5)
    inputs["lam"] = inputs["lam"][:, :, :3]
    with pytest.raises(ValueError, match=r"^lam: expected shape"):
        gspngen.compile(spec, backend="reference")(**inputs)


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    pytest.importorskip("triton")
    from gspngen.runtime import triton_launch

    monkeypatch.setattr(triton_launch, "interpreter_enabled", lambda: False)
    spec = gspngen.Spec.from_dict({"name": "t"})
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        gspngen.compile(spec, backend="triton")(**make_inputs(spec, 1, 2, 3, 4, dtype=torch.float32))
