"""Fuzzing with Hypothesis: hostile specs and tensors get a clear error or a correct result.

- the spec parser on arbitrary YAML text and arbitrary nested values: nothing
  but SpecError (or a valid Spec), in bounded time;
- the op on arbitrary tensors (shapes, dtypes including int/bool/complex,
  strides, views, channels-last, zero-size dimensions, the meta device):
  nothing but TypeError/ValueError naming the argument, or the reference's result.

Run many more examples with HYPOTHESIS_PROFILE=thorough.
"""

from __future__ import annotations

import re
import time

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

import gspngen
from gspngen import Spec, SpecError
from gspngen.spec import FIELDS
from gspngen.testing import make_inputs

PARSE_SECONDS = 2.0  # a hostile document must not make parsing hang

scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20)
nested = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                      max_leaves=12)
field_values = st.sampled_from(["lr", "tb", "stability", "softmax", "none", "channel", "shared", "sum", "stack",
                                "nhwc", "nchw", "fp32", "bf16", "cuda", "triton", 3, 0, -1, 2**40, True, None])
spec_like = st.dictionaries(st.sampled_from(FIELDS + ("conection", "extra")),
                            field_values | st.lists(field_values, max_size=5) | nested, max_size=8)


def _parse(fn, arg):
    t0 = time.perf_counter()
    try:
        spec = fn(arg)
    except SpecError as exc:
        msg = str(exc)
        assert re.match(r"^spec field ['\"]", msg) and "\n" not in msg and len(msg) < 1000, msg
        spec = None
    assert time.perf_counter() - t0 < PARSE_SECONDS
    if spec is not None:
        assert Spec.from_dict(spec.to_dict()) == spec  # a valid spec round-trips


@given(st.text(max_size=300))
def test_arbitrary_yaml_text(text):
    _parse(Spec.from_yaml, text)


@given(st.lists(st.sampled_from(["name: a", "connection: 3", "directions: [lr, tb]", "- x", "&a [*a]", "{", "}",
                                 "[", "]", '"', "'", ":", "!!python/object:os.system", "<<: *a", "chunk: 1e9",
                                 "connection: 0x3", "merge: ~", "\t", "  ", "name: &n a", "skip: yes", "%TAG"]),
                max_size=12).map("\n".join))
def test_yaml_made_of_spec_like_fragments(text):
    _parse(Spec.from_yaml, text)


@given(nested)
def test_arbitrary_nested_values(data):
    _parse(Spec.from_dict, data)
    _parse(Spec.from_yaml, yaml.safe_dump(data))


@given(spec_like)
def test_spec_like_mappings(data):
    _parse(Spec.from_dict, {"name": "a", **data} if "name" not in data else data)


# -- the op on arbitrary tensors ------------------------------------------------

SPEC = Spec.from_dict({"name": "f", "directions": ["lr", "tb"], "weight_groups": 2, "merge": "learned"})
OP = gspngen.compile(SPEC, backend="reference")
ARGS = ("x", "w", "lam", "u", "s", "m")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
          torch.complex64, torch.uint8]


@st.composite
def hostile_call(draw):
    """Valid inputs of a random size, then one or two of them spoiled in a random way."""
    N, C, H, W = (draw(st.integers(1, 2)), draw(st.sampled_from([2, 4])), draw(st.integers(1, 4)),
                  draw(st.integers(1, 4)))
    inputs = make_inputs(SPEC, N, C, H, W, dtype=torch.float32, seed=draw(st.integers(0, 3)))
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(ARGS))
        t = inputs[name]
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.dim() == 0:
            continue  # already spoiled
        how = draw(st.sampled_from(["dtype", "shape", "noncontig", "channels_last", "zero", "meta", "none",
                                    "scalar", "list", "expand", "dim"]))
        if how == "dtype":
            dt = draw(st.sampled_from(DTYPES))
            t = (t * 3).to(dt) if not dt.is_complex else t.to(dt)
        elif how == "shape":
            shape = list(t.shape)
            i = draw(st.integers(0, len(shape) - 1))
            shape[i] = draw(st.integers(0, 5))
            t = torch.randn(shape)
        elif how == "noncontig" and t.dim() >= 2:
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
        elif how == "channels_last" and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        elif how == "zero":
            t = t[..., :0]
        elif how == "meta":
            t = t.to("meta")
        elif how == "none":
            t = None
        elif how == "scalar":
            t = torch.tensor(1.0)
        elif how == "list":
            t = t.tolist()
        elif how == "expand" and t.dim() >= 1:
            t = t[..., :1].expand(t.shape)  # a broadcast view (stride 0)
        elif how == "dim":
            t = t.unsqueeze(0)
        inputs[name] = t
    return inputs


@given(hostile_call())
def test_op_on_hostile_tensors(inputs):
    try:
        y = OP(**inputs)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        # names the argument first: "x: ...", "lam: ...", or a layout hint that starts with x
        assert re.match(r"^(x|w|lam|u|s|m): ", msg), msg
        return
    # accepted: then every input was valid; the result equals the reference on plain contiguous copies
    plain = {k: None if t is None else t.contiguous() for k, t in inputs.items()}
    expect = OP(**plain)
    assert y.shape == expect.shape and y.dtype == expect.dtype
    assert torch.equal(y, expect) or torch.allclose(y, expect, equal_nan=True)


def test_meta_device_gives_shapes_forward_and_backward():
    meta = {k: None if t is None else t.to("meta").requires_grad_() for k, t in
            make_inputs(SPEC, 1, 2, 3, 4, dtype=torch.float32).items()}
    y = OP(**meta)
    assert y.device.type == "meta" and y.shape == (1, 2, 3, 4)
    y.sum().backward()
    assert all(t.grad.shape == t.shape for t in meta.values() if t is not None)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_non_float_x_is_a_type_error_naming_x(dtype):
    inputs = make_inputs(SPEC, 1, 2, 3, 4, dtype=torch.float32)
    inputs["x"] = inputs["x"].to(dtype)
    with pytest.raises(TypeError, match=r"^x: expected a floating-point dtype"):
        OP(**inputs)


def test_spec_error_for_a_hostile_key_is_one_escaped_line():
    with pytest.raises(SpecError) as info:
        Spec.from_dict({"name": "a", "bad\nkey\x1b[2J": 1})
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg and "bad\\nkey" in msg


# -- cache files and package manifests from arbitrary bytes ----------------------------

def _valid_cache_bytes() -> bytes:
    """A real cache table (one replayed entry), to mutate."""
    from gspngen.tune.replay import replay

    replay({"spec": str(GSPN4), "device": "cpu", "runs": [
        {"shape": [1, 2, 4, 5], "dtype": "fp32", "pass": "fwd",
         "candidates": {"lowered": {"median_ms": 1.0}, "reference": {"median_ms": 2.0}}}]})
    return _cache_path().read_bytes()


def _cache_path():
    from gspngen.tune import cache as tcache
    from gspngen.tune.device import device_id, identity

    return tcache.path_for(device_id(identity("cpu")))


GSPN4 = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "gspn4.yaml"
mutations = st.one_of(
    st.binary(max_size=400),
    st.tuples(st.integers(0, 2000), st.binary(max_size=40)).map(lambda t: ("splice", t)),
    st.integers(0, 3000).map(lambda n: ("truncate", n)),
    nested.map(lambda v: ("json", v)),
)


def _mutate(valid: bytes, how) -> bytes:
    import json as _json

    if isinstance(how, bytes):
        return how
    kind, arg = how
    if kind == "truncate":
        return valid[:arg]
    if kind == "splice":
        at, junk = arg
        return valid[:at] + junk + valid[at + len(junk):]
    return _json.dumps(arg, default=str).encode()


@given(mutations)
def test_cache_file_of_arbitrary_bytes_never_breaks_an_op_call(how):
    import os
    import tempfile
    import warnings

    from gspngen.tune import cache as tcache
    from gspngen.tune import lookup

    with tempfile.TemporaryDirectory() as tmp:
        old = os.environ.get("GSPNGEN_CACHE_DIR")
        os.environ["GSPNGEN_CACHE_DIR"] = tmp
        try:
            tcache.reset_memory()
            lookup.forget()
            valid = _valid_cache_bytes()
            _cache_path().write_bytes(_mutate(valid, how))
            tcache.reset_memory()
            lookup.forget()
            spec = gspngen.load_spec(GSPN4)
            inp = make_inputs(spec, 1, 2, 4, 5, dtype=torch.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", tcache.CacheWarning)  # a moved-aside file warns once
                y = gspngen.compile(spec)(*[inp[k] for k in ARGS])
            assert torch.isfinite(y).all()
        finally:
            if old is None:
                os.environ.pop("GSPNGEN_CACHE_DIR", None)
            else:
                os.environ["GSPNGEN_CACHE_DIR"] = old
            tcache.reset_memory()
            lookup.forget()


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    from gspngen.codegen import write_package

    out = tmp_path_factory.mktemp("pkg") / "fuzz_pkg"
    write_package(Spec.from_dict({"name": "fuzz_pkg", "backends": ["triton"], "precision": ["fp32"]}), out)
    return out


@given(mutations)
def test_manifest_of_arbitrary_bytes_is_a_one_line_import_error(package_dir, how):
    import shutil
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "fuzz_pkg"
        shutil.copytree(package_dir, pkg)
        manifest = pkg / "manifest.json"
        manifest.write_bytes(_mutate(manifest.read_bytes(), how))
        try:
            gspngen.load_package(pkg)
        except ImportError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("gspngen package ")
        else:
            # a mutation that kept the manifest valid: then the package loaded and verified
            pass
