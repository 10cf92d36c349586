"""timm's model conventions, held by every registered ``rapidnet_*`` model, training and fused forms alike.

Each test restates one behaviour that timm's own model tests (``tests/test_models.py`` of pytorch-image-models)
demand of a registered model: forward/backward, default cfgs and the head's pooling contract, TorchScript, FX
(trace, then script the GraphModule), ``torch.export``, ``features_only`` in timm's wrapper classes,
``forward_intermediates``/``prune_intermediate_layers``, gradient checkpointing, and ``pretrained=True`` through the
Hugging Face hub cache, here offline with a cache the test writes in the authors' file format.
"""

from __future__ import annotations

import math
import re
import socket
import warnings

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import rapidnet
from conftest import MICRO, REFERENCE, randomize_
from rapidnet.models.key_names import convert_official

VARIANTS = ["rapidnet_ti", "rapidnet_s", "rapidnet_m", "rapidnet_b"]
TOL = dict(rtol=1e-4, atol=1e-4)

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated", "ignore:NOTE. The nodes obtained by tracing"
)

_MODELS: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}


def forms(variant: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(training form in eval mode, fused form) of a variant with non-trivial BN statistics; built once per run."""
    if variant not in _MODELS:
        model = randomize_(timm.create_model(variant)).eval()
        _MODELS[variant] = (model, rapidnet.reparameterize(model))
    return _MODELS[variant]


def out_tensor(outputs) -> torch.Tensor:
    return torch.cat(outputs) if isinstance(outputs, (tuple, list)) else outputs


# ---- forward, backward, default cfgs ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_cfg_names_shapes_and_head_contract(variant):
    """timm ``test_model_default_cfgs``: forward_features gives the cfg's ``pool_size`` with ``num_features``
    channels; pre-logits have ``head_hidden_size``; ``reset_classifier(0)`` returns exactly the pre-logits;
    ``reset_classifier(0, '')`` and ``create_model(num_classes=0, global_pool='')`` return the unpooled NCHW map of
    the head's 1x1 conv at every position; the cfg's classifier and first conv name real weights."""
    model = timm.create_model(variant).eval()
    model.load_state_dict(forms(variant)[0].state_dict())
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg and model.num_classes == cfg["num_classes"] == 1000
    assert model.num_features == model.widths[-1] > 0 and model.head_hidden_size == model.head_dim > 0
    state_dict = model.state_dict()
    for name in cfg["classifier"]:
        assert f"{name}.weight" in state_dict
    assert f"{cfg['first_conv']}.weight" in state_dict and state_dict[f"{cfg['first_conv']}.weight"].shape[1] == 3
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        features = model.forward_features(x)
        pre = model.forward_head(features, pre_logits=True)
        assert features.shape == (1, model.num_features, *cfg["pool_size"])
        assert pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0 and isinstance(model.get_classifier(), torch.nn.Identity)
        pooled = model(x)
        assert torch.equal(pooled, pre)
        model.reset_classifier(0, "")
        assert model.global_pool == ""
        unpooled = model(x)
        assert unpooled.shape == (1, model.head_hidden_size, *cfg["pool_size"])
        assert torch.allclose(unpooled, model.head.conv(features), rtol=1e-5, atol=1e-6)  # the 1x1 conv everywhere
        assert not torch.allclose(unpooled.mean((2, 3)), pooled, atol=1e-3)  # pooling comes first, not last
        fresh = timm.create_model(variant, num_classes=0, global_pool="").eval()
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(x), unpooled)
        fresh = timm.create_model(variant, num_classes=0).eval()
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(x), pre)


def test_reset_classifier_and_global_pool():
    model = randomize_(rapidnet.create_model("rapidnet_ti", num_classes=10, **MICRO)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5 and model.distillation
        pooled = model(x)
        model.reset_classifier(5, "")  # the classifier then acts as a 1x1 conv at every position
        dense = model(x)
        assert dense.shape == (2, 5, 2, 3)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pre.shape == (2, MICRO["head_dim"], 2, 3)
        per_position = (model.head.fc(pre.permute(0, 2, 3, 1)) + model.head.fc_dist(pre.permute(0, 2, 3, 1))) / 2
        assert torch.allclose(dense, per_position.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-6)
        model.reset_classifier(5, "avg")
        assert model(x).shape == (2, 5) and not torch.equal(model(x), pooled)  # a fresh classifier
        model.reset_classifier(3, distillation=False)
        assert model(x).shape == (2, 3) and not model.distillation
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, "max")
    with pytest.raises(ValueError, match="global_pool"):
        rapidnet.create_model("rapidnet_ti", global_pool="token")


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_reaches_every_parameter(variant):
    """timm ``test_model_backward``: a training step with ``num_classes=42`` gives every parameter a gradient."""
    model = timm.create_model(variant, num_classes=42).train()
    outputs = out_tensor(model(torch.randn(2, 3, 64, 64)))  # (cls, dist) in training
    outputs.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert outputs.shape == (4, 42) and not torch.isnan(outputs).any()


def test_grad_checkpointing_keeps_eval_outputs():
    """timm ``test_model_forward``: after ``set_grad_checkpointing()`` the forward gives the same outputs."""
    model, _ = forms("rapidnet_ti")
    x = torch.randn(1, 3, 96, 96)
    before = model(x)
    model.set_grad_checkpointing()
    try:
        assert all(stage.grad_checkpointing for stage in model.stages)
        assert torch.allclose(model(x), before, rtol=1e-4, atol=1e-5)
    finally:
        model.set_grad_checkpointing(False)


# ---- TorchScript, FX, torch.export -------------------------------------------------------------------------------

_TRACER_KWARGS = dict(
    leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
)


def fx_model(model: torch.nn.Module, train: bool = False) -> torch.fx.GraphModule:
    """An FX GraphModule returning the model's output, built the way timm's tests build it (torchvision's feature
    extractor with timm's leaf modules and functions); in training every output node is returned."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=_TRACER_KWARGS)
    train_return = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**_TRACER_KWARGS).trace(model)
        output_inputs = [n.name for n in next(n for n in graph.nodes if n.op == "output").all_input_nodes]
        names = [n.name for n in graph.nodes]
        train_return = [train_nodes[names.index(name)] for name in output_inputs]  # same order, output node last
    return create_feature_extractor(
        model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=_TRACER_KWARGS
    )


@pytest.mark.parametrize("fused", [False, True], ids=["training-form", "fused"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_torchscript(variant, fused):
    """timm ``test_model_forward_torchscript``: ``torch.jit.script`` of the model, with the eager outputs."""
    model = forms(variant)[fused]
    x = torch.randn(1, 3, 64, 64)
    with timm.set_scriptable(True):
        scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), **TOL)


@pytest.mark.parametrize("fused", [False, True], ids=["training-form", "fused"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fx_trace_then_script(variant, fused):
    """timm ``test_model_forward_fx`` (bit-identical outputs) and ``test_model_forward_fx_torchscript``."""
    model = forms(variant)[fused]
    x = torch.randn(1, 3, 64, 64)
    graph_module = fx_model(model)
    with torch.inference_mode():
        expected = model(x)
        assert torch.equal(out_tensor(tuple(graph_module(x).values())), expected)
    scripted = torch.jit.script(graph_module)
    with torch.inference_mode():
        assert torch.allclose(out_tensor(tuple(scripted(x).values())), expected, **TOL)


def test_fx_backward_in_training():
    """timm ``test_model_backward_fx``: the training graph returns both heads and trains every parameter."""
    model = timm.create_model("rapidnet_ti", num_classes=42, **MICRO).train()
    graph_module = fx_model(model, train=True)
    outputs = out_tensor(tuple(graph_module(torch.randn(2, 3, 64, 64)).values()))
    outputs.mean().backward()
    assert outputs.shape == (4, 42)
    assert all(p.grad is not None for p in graph_module.parameters())
    assert sum(p.numel() for p in graph_module.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("fused", [False, True], ids=["training-form", "fused"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_export(variant, fused):
    """``torch.export`` of both forms; the fused program is the plain folded graph: contiguous weights (ExecuTorch's
    XNNPACK lowering refuses channels_last ones), convs with their own padding, no oneDNN calls, no BatchNorm."""
    model = forms(variant)[fused]
    x = torch.randn(1, 3, 64, 64)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), **TOL)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("mkldnn" in op or "pad" in op for op in ops), ops
    if fused:
        weights = {**program.state_dict, **dict(program.named_buffers())}
        assert weights and all(t.is_contiguous() for t in weights.values())
        assert not any("batch_norm" in op for op in ops)


# ---- features ------------------------------------------------------------------------------------------------------


def _check_features(features, info, input_hw, batch=1):
    assert len(features) == len(info.channels()) >= 3
    for f, chs, reduction in zip(features, info.channels(), info.reduction(), strict=True):
        assert f.shape[:2] == (batch, chs)
        assert f.shape[2] <= math.ceil(input_hw[0] / reduction) + 1
        assert f.shape[3] <= math.ceil(input_hw[1] / reduction) + 1
        assert not torch.isnan(f).any()


@pytest.mark.parametrize("feature_cls", [None, "list", "dict", "hook", "getter", "fx"])
def test_features_only_in_every_timm_wrapper(feature_cls):
    """timm ``test_model_forward_features`` and ``..._intermediates_features`` (``feature_cls='getter'``): the
    same four stage outputs in every wrapper, the training model's weights loading into each."""
    kwargs = {} if feature_cls is None else dict(feature_cls=feature_cls)
    backbone = timm.create_model("rapidnet_ti", features_only=True, **kwargs, **MICRO).eval()
    reference = randomize_(timm.create_model("rapidnet_ti", **MICRO)).eval()
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    assert backbone.feature_info.channels() == list(MICRO["widths"])
    assert "mean" in backbone.pretrained_cfg and "classifier" not in backbone.pretrained_cfg
    own = backbone.state_dict()
    # each wrapper spells the keys its own way: stages.0 / stages_0 (flattened), model.stages.0, graph_module.stages.0
    spellings = {re.sub(r"^(?:model\.|graph_module\.)?(stem|stages)[._](\d+)", r"\1.\2", k): k for k in own}
    backbone.load_state_dict({spellings[k]: v for k, v in reference.state_dict().items() if k in spellings})
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        features = backbone(x)
        features = list(features.values()) if isinstance(features, dict) else features
        expected = reference.forward_intermediates(x, intermediates_only=True)
    _check_features(features, backbone.feature_info, (96, 80))
    assert all(torch.equal(a, b) for a, b in zip(features, expected, strict=True))


def test_fx_features_script():
    """timm ``test_model_forward_torchscript_with_features_fx``: the FX feature wrapper scripts."""
    with timm.set_scriptable(True):
        backbone = timm.create_model("rapidnet_ti", features_only=True, feature_cfg={"feature_cls": "fx"}, **MICRO)
    scripted = torch.jit.script(backbone.eval())
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        outputs = scripted(x)
        assert isinstance(outputs, list)
        assert all(torch.allclose(a, b, **TOL) for a, b in zip(outputs, backbone(x), strict=True))
    _check_features(outputs, backbone.feature_info, (64, 64))


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_intermediates(variant):
    """timm ``test_model_forward_intermediates``: every stage, the final output equal to ``forward_features``, the
    same with gradient checkpointing; indices, negative indices and ``stop_early``."""
    model = timm.create_model(variant).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        _check_features(intermediates, info, (96, 96))
        assert torch.equal(final, model.forward_features(x))
        assert torch.equal(final, intermediates[-1])
        model.set_grad_checkpointing()
        again, _ = model.forward_intermediates(x)
        assert torch.allclose(again, final, rtol=1e-4, atol=1e-5)
        model.set_grad_checkpointing(False)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [f.shape[1] for f in last_two] == info.channels()[-2:]
        early, picked = model.forward_intermediates(x, indices=[-4, -3], stop_early=True)
        assert torch.equal(early, intermediates[1]) and all(
            torch.equal(a, b) for a, b in zip(picked, intermediates[:2], strict=True)
        )
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers():
    model = randomize_(rapidnet.create_model("rapidnet_ti", num_classes=10, **MICRO)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        assert model.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(model.stages) == 2 and model.num_classes == 0
        assert model.num_features == model.head_hidden_size == MICRO["widths"][1]
        kept = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(kept, expected[:2], strict=True))
        assert torch.equal(model(x), expected[1])  # no head left: the last kept stage, unpooled
        rapidnet.reparameterize(model)  # a pruned model still folds
    whole = rapidnet.create_model("rapidnet_ti", **MICRO)
    assert whole.prune_intermediate_layers(4, prune_head=False) == [0, 1, 2, 3]
    assert whole.num_classes == 1000 and len(whole.stages) == 4


# ---- pretrained=True through the hub cache, offline ------------------------------------------------------------

# this project's key names -> the authors' (SPEC.md "Official checkpoint format"); written from the spec, not from
# the converter under test
_STEM = {
    "stem.0.conv.": "stem.stem.0.",
    "stem.0.bn.": "stem.stem.1.",
    "stem.1.conv.": "stem.stem.3.",
    "stem.1.bn.": "stem.stem.4.",
}
_IR = {
    "layer_scale.gamma": "layer_scale_1",
    "expand.conv.": "dws.pw1.",
    "expand.bn.": "dws.norm1.",
    "dw.conv.": "dws.dw.",
    "dw.bn.": "dws.norm2.",
    "project.conv.": "dws.pw2.",
    "project.bn.": "dws.norm3.",
}
_DC = {
    "layer_scale1.gamma": "layer_scale_1",
    "layer_scale2.gamma": "layer_scale_2",
    "mixer.cpe.pe.": "mixer.cpe.pe.",
    "mixer.fc1.conv.": "mixer.fc1.0.",
    "mixer.fc1.bn.": "mixer.fc1.1.",
    "mixer.branches.0.conv.": "mixer.graph_conv.nn.0.",
    "mixer.branches.0.bn.": "mixer.graph_conv.nn.1.",
    "mixer.branches.1.conv.": "mixer.graph_conv.nn_2.0.",
    "mixer.branches.1.bn.": "mixer.graph_conv.nn_2.1.",
    "mixer.fc2.conv.": "mixer.fc2.0.",
    "mixer.fc2.bn.": "mixer.fc2.1.",
    "ffn.dw.conv.": "ffn.conv.conv.",
    "ffn.dw.bn.": "ffn.norm1.",
    "ffn.fc1.conv.": "ffn.fc1.",
    "ffn.fc1.bn.": "ffn.norm2.",
    "ffn.fc2.conv.": "ffn.fc2.",
    "ffn.fc2.bn.": "ffn.norm3.",
}
_HEAD = {
    "head.conv.conv.": "prediction.1.",
    "head.conv.bn.": "prediction.2.",
    "head.fc_dist.": "dist_head.",
    "head.fc.": "head.",
}


def _rename(key: str, table: dict[str, str]) -> str:
    old = next(old for old in table if key.startswith(old))
    return table[old] + key[len(old) :]


def to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training-form state dict in the authors' key names and shapes (layer scales (C,1,1), 1x1-conv heads)."""
    out = {}
    for key, value in state_dict.items():
        if m := re.match(r"^stages\.(\d+)\.downsample\.(conv|bn)\.(.*)$", key):
            new = f"backbone.{m[1]}.0.conv.{0 if m[2] == 'conv' else 1}.{m[3]}"
        elif m := re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.*)$", key):
            stage, block, rest = int(m[1]), int(m[2]), m[3]
            table = _DC if rest.startswith(("mixer.", "ffn.", "layer_scale1", "layer_scale2")) else _IR
            new = f"backbone.{stage}.{block + (stage > 0)}.{_rename(rest, table)}"
        else:
            new = _rename(key, _STEM if key.startswith("stem.") else _HEAD)
        if "layer_scale" in new:
            value = value.reshape(-1, 1, 1)
        elif new.startswith(("head.", "dist_head.")) and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value.clone()
    return out


def test_to_official_writes_the_authors_format(micro_checkpoint):
    """The helper the hub test relies on: it reproduces the authors' own micro checkpoint exactly, and the key table
    of the authors' RapidNet-Ti where the reference data is present."""
    official = torch.load(micro_checkpoint, weights_only=True)["model"]
    again = to_official(convert_official(official))
    assert again.keys() == official.keys()
    assert all(torch.equal(again[k], v) for k, v in official.items())
    table = REFERENCE / "official_keys_rapidnet_ti.tsv"
    if table.exists():
        rows = dict(line.split("\t") for line in table.read_text().splitlines())
        ours = to_official(timm.create_model("rapidnet_ti").state_dict())
        assert {k: "x".join(map(str, v.shape)) for k, v in ours.items()} == rows


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A Hugging Face hub cache in ``tmp_path`` holding SLDGroup/RapidNet's ``RapidNet_Ti.pth`` (the authors' format,
    ``{'model': state_dict}``), the hub switched offline, and any network connection made an error."""
    import huggingface_hub.constants

    model = randomize_(timm.create_model("rapidnet_ti"), seed=3).eval()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--SLDGroup--RapidNet"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    torch.save({"model": to_official(model.state_dict())}, repo / "snapshots" / commit / "RapidNet_Ti.pth")
    for name, value in (("HF_HOME", tmp_path), ("HF_HUB_CACHE", tmp_path / "hub"), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, str(value))
    # huggingface_hub reads the environment once, at import: point its constants at the same cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return model


def test_pretrained_true_loads_the_authors_file_from_the_hub_cache(offline_hub):
    """timm ``test_model_load_pretrained`` / ``test_model_features_pretrained``, offline: ``pretrained=True`` finds
    the authors' file in the hub cache and gives the same outputs; other class counts keep the backbone."""
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not download" style fallbacks
        model = timm.create_model("rapidnet_ti", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(x), offline_hub(x))
        for num_classes in (5, 0):
            other = timm.create_model("rapidnet_ti", pretrained=True, num_classes=num_classes).eval()
            assert torch.equal(other.forward_features(x), offline_hub.forward_features(x))
            assert other(x).shape == (1, num_classes or other.head_hidden_size)
        backbone = timm.create_model("rapidnet_ti", pretrained=True, features_only=True).eval()
        expected = offline_hub.forward_intermediates(x, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(backbone(x), expected, strict=True))
        assert torch.equal(rapidnet.create_model("rapidnet_ti", pretrained=True).eval()(x), offline_hub(x))


def test_pretrained_with_other_input_channels(offline_hub):
    """timm ``test_model_load_pretrained`` builds ``in_chans=1``: timm's ``adapt_input_conv`` sums the RGB filters,
    so a grey image gives what the RGB model gives on that image repeated over three channels."""
    grey = timm.create_model("rapidnet_ti", pretrained=True, in_chans=1, num_classes=5).eval()
    stem = offline_hub.stem[0].conv.weight
    assert torch.allclose(grey.stem[0].conv.weight, stem.sum(1, keepdim=True))
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        got, want = grey.forward_features(x), offline_hub.forward_features(x.expand(-1, 3, -1, -1))
    # summing three filters reorders float additions; features reach hundreds, so compare relative to their scale
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
