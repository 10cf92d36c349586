"""LiteRT: the .tflite of the fused model matches PyTorch, carries its metadata, keeps the dilated convolutions as
native CONV_2D ops, quantizes to a smaller int8 file that agrees with fp32; bad input is one line."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

import rapidnet
from conftest import MICRO, randomize_
from rapidnet.deploy.common import METADATA_KEY, export_metadata, prepare_model, preprocess_config
from rapidnet.deploy.litert import LiteRT, with_metadata
from rapidnet.errors import CheckpointError, ConfigError

TOL = 1e-4
RES = (64, 64)
BATCH = 2  # the exported batch: the runner splits and pads other batch sizes
RT = LiteRT()


def _micro(features_only: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = rapidnet.create_model("rapidnet_ti", num_classes=10, features_only=features_only, **MICRO)
    return randomize_(model, seed).eval()


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(x)
    return [o.numpy() for o in (out if isinstance(out, (list, tuple)) else [out])]


def _close(ours: list[np.ndarray], ref: list[np.ndarray]) -> bool:
    assert [a.shape for a in ours] == [b.shape for b in ref]
    return all(np.allclose(a, b, rtol=TOL, atol=TOL) for a, b in zip(ours, ref, strict=True))


def _operators(path: Path) -> list[tuple[str, tuple[int, int] | None, str]]:
    """(op name, dilation of a convolution, type of its first input) for every op of the main graph."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(path.read_bytes(), 0)
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    graph = model.Subgraphs(0)
    ops = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = codes[op.OpcodeIndex()]
        name = names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
        dilation = None
        options = {"CONV_2D": schema.Conv2DOptions, "DEPTHWISE_CONV_2D": schema.DepthwiseConv2DOptions}.get(name)
        if options is not None:
            table, parsed = op.BuiltinOptions(), options()
            parsed.Init(table.Bytes, table.Pos)
            dilation = (parsed.DilationHFactor(), parsed.DilationWFactor())
        ops.append((name, dilation, types[graph.Tensors(op.Inputs(0)).Type()]))
    return ops


def _metadata_names(path: Path) -> list[str]:
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(path.read_bytes(), 0)
    return [model.Metadata(i).Name().decode() for i in range(model.MetadataLength())]


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return _micro()


@pytest.fixture(scope="module")
def exported(classifier, tmp_path_factory) -> Path:
    """One fp32 export shared by the tests: batch 2, metadata with class names."""
    fused = prepare_model(classifier)
    meta = export_metadata(fused, preprocess_config(fused, RES), {"class_names": [f"c{i}" for i in range(10)]})
    return RT.export(classifier, tmp_path_factory.mktemp("litert") / "m.tflite", RES, batch_size=BATCH, metadata=meta)


@pytest.fixture(scope="module")
def quantized(classifier, exported) -> Path:
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((1, 3, *RES)).astype(np.float32) for _ in range(6)]
    calibration.append(rng.standard_normal((3, 3, *RES)).astype(np.float32))  # 9 images: regrouped into 2s
    return RT.quantize(classifier, exported, exported.with_name("m_int8.tflite"), calibration)


# ---- fp32 ----------------------------------------------------------------------------------------------------------


def test_classifier_matches_pytorch_at_any_batch(classifier, exported):
    runner = RT.load(exported, threads=1)
    assert runner.fixed_batch == BATCH and runner.runtime == "litert"
    for n in (BATCH, 3):  # 3: one full chunk and one padded
        x = torch.randn(n, 3, *RES)
        assert _close(runner(x), _outputs(classifier, x))


def test_features_only_matches_pytorch(tmp_path):
    model = _micro(features_only=True, seed=1)
    runner = RT.load(RT.export(model, tmp_path / "f.tflite", RES), threads=1)
    x = torch.randn(1, 3, *RES)
    ours = runner(x)
    assert [o.shape for o in ours] == [(1, 16, 16, 16), (1, 24, 8, 8), (1, 32, 4, 4), (1, 48, 2, 2)]
    assert _close(ours, _outputs(model, x))
    assert runner.metadata["outputs"] == [f"features_{i}" for i in range(4)]


def test_metadata_round_trips_inside_the_file(exported):
    meta = RT.read_metadata(exported)
    assert meta["preprocess"]["input_size"] == [3, *RES] and meta["outputs"] == ["logits"]
    assert meta["class_names"][:2] == ["c0", "c1"] and meta["arch"]["num_classes"] == "10"
    assert RT.load(exported, threads=1).metadata == meta
    assert [p.name for p in exported.parent.iterdir() if p.name.startswith("m.tflite")] == ["m.tflite"]  # no sidecar
    again = exported.with_name("again.tflite")  # replacing the entry keeps one, with the new text
    again.write_bytes(with_metadata(exported.read_bytes(), json.dumps({"x": 1})))
    assert RT.read_metadata(again) == {"x": 1}
    assert _metadata_names(exported) == _metadata_names(again) and _metadata_names(again).count(METADATA_KEY) == 1


def test_dilated_convs_stay_native_conv2d(classifier, exported):
    """MLDC's dilated 3x3 convolutions are CONV_2D ops with dilation 2 and 3, not SPACE_TO_BATCH_ND detours."""
    ops = _operators(exported)
    names = collections.Counter(name for name, _, _ in ops)
    assert not {"SPACE_TO_BATCH_ND", "BATCH_TO_SPACE_ND"} & set(names)
    dilated = collections.Counter(d for name, d, _ in ops if name == "CONV_2D" and d != (1, 1))
    fused = prepare_model(classifier)
    want = collections.Counter(
        m.dilation for m in fused.modules() if isinstance(m, torch.nn.Conv2d) and m.dilation != (1, 1)
    )
    assert dilated == want == {(2, 2): 2, (3, 3): 2}
    assert names["GELU"] > 0 and names["DEPTHWISE_CONV_2D"] > 0


# ---- int8 ----------------------------------------------------------------------------------------------------------


def test_int8_is_smaller_runs_in_int8_and_agrees(exported, quantized):
    assert quantized.stat().st_size < exported.stat().st_size / 2
    ops = _operators(quantized)
    convs = [t for name, _, t in ops if name in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    assert convs and set(convs) == {"INT8"}
    # GELU stays float (XNNPACK has no int8 GELU: each would split the delegated graph)
    gelus = [t for name, _, t in ops if name == "GELU"]
    assert gelus and set(gelus) == {"FLOAT32"}
    assert RT.read_metadata(quantized) == RT.read_metadata(exported)
    fp32, int8 = RT.load(exported, threads=1), RT.load(quantized, threads=1)
    x = torch.randn(8, 3, *RES, generator=torch.Generator().manual_seed(0))
    a, b = fp32(x)[0], int8(x)[0]  # float32 in and out, like the fp32 file
    assert b.dtype == np.float32 and b.shape == a.shape
    assert (a.argmax(1) == b.argmax(1)).sum() >= 6
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


# ---- bad input -----------------------------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors(classifier, exported, tmp_path):
    junk = tmp_path / "junk.tflite"
    junk.write_text("not a flatbuffer at all")
    cases = [
        (ConfigError, lambda: RT.export(classifier, tmp_path / "m.onnx", RES)),
        (ConfigError, lambda: RT.export(classifier, tmp_path / "m.tflite", RES, dynamic_batch=True)),
        (CheckpointError, lambda: RT.load(tmp_path / "missing.tflite")),
        (CheckpointError, lambda: RT.load(junk)),
        (CheckpointError, lambda: RT.read_metadata(junk)),
        (ConfigError, lambda: RT.quantize(classifier, exported, tmp_path / "q.pte", [])),
        (ConfigError, lambda: RT.load(exported, threads=1)(np.zeros((1, 3, 32, 32), np.float32))),
    ]
    for error, call in cases:
        with pytest.raises(error) as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=r"junk\.tflite"):
        RT.load(junk)
    assert not (tmp_path / "m.tflite").exists()
