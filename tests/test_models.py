"""gspngen.nn models: the mixer, block and backbone against an independent composition of the reference
op and plain torch functions, torch.compile (fullgraph, dynamic shapes), export, autocast, state_dict."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F

import gspngen
from gspngen.backends.reference import forward as reference_scan
from gspngen.nn import GSPN2d, GSPNBackbone, GSPNBlock


def spec_of(**kw):
    base = {"name": "t", "modulation": True, "skip": True, "merge": "learned"}
    return gspngen.Spec.from_dict({**base, **kw})


# -- the independent composition: channel-first plain torch + the reference op ---------------------------


def lin(mod, t):
    """A per-pixel linear map on (N, C, H, W) from a module's weight (Conv2d or Linear shaped)."""
    w = mod.weight.reshape(mod.weight.shape[0], -1)
    return torch.einsum("oc,nchw->nohw", w, t) + mod.bias[None, :, None, None]


def ln(mod, t):
    return F.layer_norm(t.permute(0, 2, 3, 1), mod.normalized_shape, mod.weight, mod.bias, mod.eps).permute(0, 3, 1, 2)


def ref_mixer(layer, x):
    """GSPN2d on channel-first x, rebuilt from its parameters (DESIGN §6 head order: w, lam, u, s)."""
    spec = layer.spec
    D, k, G, d = spec.num_directions, spec.connection, layer.groups, layer.d_state
    cf = gspngen.Spec.from_dict({**json.loads(spec.to_json()), "layout": "nchw"})
    N, _, H, W = x.shape
    heads = lin(layer.heads, x)
    sizes = [D * k * G, D * d] + [D * d] * (int(spec.modulation) + int(spec.skip))
    parts = list(torch.split(heads, sizes, dim=1))
    w = parts.pop(0).reshape(N, D, k, G, H, W)
    lam = torch.sigmoid(parts.pop(0).reshape(N, D, d, H, W))
    u = parts.pop(0).reshape(N, D, d, H, W) if spec.modulation else None
    s = parts.pop(0).reshape(N, D, d, H, W) if spec.skip else None
    y = reference_scan(cf, lin(layer.proxy, x), w, lam, u, s, layer.merge_weights)
    if spec.merge == "stack":
        y = y.reshape(N, D * d, H, W)
    return lin(layer.out, y)


def ref_block(block, x):
    x = x + ref_mixer(block.mixer, ln(block.norm1, x))
    return x + lin(block.mlp[2], F.gelu(lin(block.mlp[0], ln(block.norm2, x))))


def ref_backbone(model, img):
    conv = model.stem[0]
    x = ln(model.stem[2], F.conv2d(img, conv.weight, conv.bias, stride=conv.patch))
    for i, stage in enumerate(model.stages):
        if i:
            norm, down = model.downsamples[i - 1]
            x = F.conv2d(ln(norm, x), down.weight, down.bias, stride=2)
        for block in stage:
            x = ref_block(block, x)
    x = ln(model.norm, x)
    if model.head is None:
        return x
    return model.head(x.amax(dim=(2, 3)) if model.pool == "max" else x.mean(dim=(2, 3)))


def channel_first(t, layout):
    return t.permute(0, 3, 1, 2) if layout == "nhwc" else t


def to_layout(t, layout):
    return t.permute(0, 2, 3, 1) if layout == "nhwc" else t


def randomize(model):
    """Random parameters everywhere (LayerNorm and merge weights included), so nothing is left at its init."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.numel() > 4 else 0.0))
    return model


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("merge", ["learned", "stack"])
def test_mixer_and_block_match_independent_composition(layout, merge):
    torch.manual_seed(0)
    spec = spec_of(layout=layout, merge=merge, weight_groups=2)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    mixer = randomize(GSPN2d(6, spec, d_state=4, backend="reference").double())
    torch.testing.assert_close(channel_first(mixer(to_layout(x, layout)), layout), ref_mixer(mixer, x),
                               rtol=1e-10, atol=1e-10)
    block = randomize(GSPNBlock(6, spec, d_state=4, mlp_ratio=2, backend="reference").double())
    y = block(to_layout(x, layout))
    assert y.shape == to_layout(x, layout).shape
    torch.testing.assert_close(channel_first(y, layout), ref_block(block, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout,pool", [("nchw", "mean"), ("nhwc", "max")])
def test_backbone_matches_independent_composition_and_trains(layout, pool):
    torch.manual_seed(1)
    model = GSPNBackbone(spec_of(layout=layout), in_chans=2, dims=(4, 8), depths=(1, 2), patch_size=2,
                         num_classes=3, d_state=4, mlp_ratio=2, backend="reference", pool=pool)
    randomize(model).double()
    img = torch.randn(2, 2, 8, 12, dtype=torch.float64)
    logits = model(img)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, ref_backbone(model, img), rtol=1e-10, atol=1e-10)
    feats = model.forward_features(img)
    assert [tuple(channel_first(f, layout).shape) for f in feats] == [(2, 4, 4, 6), (2, 8, 2, 3)]
    logits.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # num_classes=None: the normalised last stage, in the spec's layout
    trunk = GSPNBackbone(spec_of(layout=layout), in_chans=2, dims=(4,), depths=(1,), patch_size=4,
                         backend="reference")
    assert tuple(channel_first(trunk(img.float()), layout).shape) == (2, 4, 2, 3)


def test_spec_sources_and_bad_arguments(tmp_path):
    op = gspngen.compile(spec_of(), backend="reference")
    assert GSPNBlock(4, op, d_state=2).spec is op.spec  # an object with a .spec (a GSPNOp, a package)
    path = tmp_path / "s.yaml"
    path.write_text("name: f\ndirections: [lr, tb]\n")
    assert GSPNBackbone(str(path), in_chans=1, dims=(4,), depths=(1,)).spec.name == "f"
    with pytest.raises(TypeError, match="spec"):
        GSPNBlock(4, 3.0)
    with pytest.raises(ValueError, match="dim"):
        GSPNBlock(0, spec_of())
    with pytest.raises(ValueError, match="mlp_ratio"):
        GSPNBlock(4, spec_of(), mlp_ratio=0)
    with pytest.raises(ValueError, match="dims, depths"):
        GSPNBackbone(spec_of(), dims=(4, 8), depths=(1,))
    with pytest.raises(ValueError, match=r"depths\[1\]"):
        GSPNBackbone(spec_of(), dims=(4, 8), depths=(1, 0))
    with pytest.raises(ValueError, match="patch_size"):
        GSPNBackbone(spec_of(), patch_size=0)
    with pytest.raises(ValueError, match="pool"):
        GSPNBackbone(spec_of(), pool="sum")
    with pytest.raises(ValueError, match="num_classes"):
        GSPNBackbone(spec_of(), num_classes=-1)
    model = GSPNBackbone(spec_of(), in_chans=1, dims=(4,), depths=(1,), patch_size=4, backend="reference")
    with pytest.raises(ValueError, match=r"x: expected images \(N, 1, H, W\)"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible by the patch size 4"):
        model(torch.randn(1, 1, 8, 6))


def test_state_dict_round_trip():
    torch.manual_seed(2)
    kw = dict(in_chans=1, dims=(4, 8), depths=(1, 1), patch_size=2, num_classes=2, backend="reference")
    a, b = GSPNBackbone(spec_of(), **kw), GSPNBackbone(spec_of(), **kw)
    buf = io.BytesIO()
    torch.save(randomize(a).state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    img = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(b(img), a(img), rtol=0, atol=0)
    # the pointwise maps keep nn.Conv2d's parameter names and shapes
    assert a.state_dict()["stages.0.0.mixer.proxy.weight"].shape == (4, 4, 1, 1)


def test_autocast_runs_the_op_in_fp32_on_cpu():
    """Under bf16 autocast on CPU every floating input of gspngen::scan arrives as fp32 and y is fp32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.gspngen.scan.default:
                seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
                out = func(*args, **(kwargs or {}))
                seen.append({out[0].dtype})
                return out
            return func(*args, **(kwargs or {}))

    torch.manual_seed(3)
    block = GSPNBlock(6, spec_of(), d_state=4, backend="reference")
    x = torch.randn(2, 6, 5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), Spy():
        y = block(x)
    assert seen == [{torch.float32}, {torch.float32}]
    assert y.dtype == torch.float32 and torch.isfinite(y).all()  # residual stream stays fp32
    y.sum().backward()
    assert block.mixer.merge_weights.grad.dtype == torch.float32
    # bf16 linear maps around an fp32 scan: close to the fp32 model (bf16 has 8 bits of mantissa)
    torch.testing.assert_close(y, block(x), rtol=0.05, atol=0.05)
    # bf16 inputs called directly under autocast are cast up too
    op = block.mixer.op
    args = block.mixer._op_inputs(x.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.gspngen.scan(*[None if args[k] is None else args[k].bfloat16().contiguous() for k in
                                       ("x", "w", "lam", "u", "s", "m")], op._spec_json, "reference")[0]
    assert out.dtype == torch.float32


def test_export_and_run():
    torch.manual_seed(4)
    model = GSPNBackbone(spec_of(), in_chans=1, dims=(4, 8), depths=(1, 1), patch_size=2, num_classes=2,
                         backend="reference").eval()
    img = torch.randn(2, 1, 8, 8)
    h = torch.export.Dim("h", min=1, max=64)
    ep = torch.export.export(model, (img,), dynamic_shapes=({2: 4 * h, 3: 4 * h},))
    assert any("gspngen.scan" in str(n.target) for n in ep.graph.nodes)
    for size in (8, 12):
        x = torch.randn(2, 1, size, size)
        torch.testing.assert_close(ep.module()(x), model(x))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.export.load(buf).module()(img), model(img))


def test_compile_fullgraph_forward_backward():
    torch.manual_seed(5)
    model = GSPNBackbone(spec_of(layout="nhwc"), in_chans=1, dims=(4, 8), depths=(1, 1), patch_size=2,
                         num_classes=2, backend="reference")
    img = torch.randn(2, 1, 8, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(img)
    torch.testing.assert_close(y, model(img))
    (g_c,) = torch.autograd.grad(y.sum(), model.stem[0].weight)
    (g_e,) = torch.autograd.grad(model(img).sum(), model.stem[0].weight)
    torch.testing.assert_close(g_c, g_e)


def test_inductor_dynamic_compiles_once_for_three_sizes():
    """The issue's case: torch.compile(GSPN2d(8, 'examples/gspn4.yaml'), dynamic=True) with inductor
    compiled one graph per image size (see gspngen.nn.Conv1x1); now one graph serves 12², 16², 20²."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(6)
    layer = GSPN2d(8, "examples/gspn4.yaml")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, dynamic=True, fullgraph=True, backend=counter)
    # a cached graph compiled before the fix carries its old size guards: compile from scratch
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        for size in (12, 16, 20):
            x = torch.randn(2, 8, size, size, requires_grad=True)
            y = compiled(x)
            torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-5)
            y.square().sum().backward()
            assert x.grad is not None and x.grad.shape == x.shape
    assert counter.frame_count == 1
