"""A Semantic FPN run's checkpoint exported to each runtime, then scored and drawn by ``rapidnet seg eval|predict``
from the file as from the checkpoint."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import run_cli, tiny_dense_run
from rapidnet.cli.main import main
from rapidnet.deploy import registry

FILE_RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino", "executorch": "executorch", "litert": "litert_torch"}


_run = run_cli


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, fm_root) -> tuple[Path, Path]:
    return tiny_dense_run(tmp_path_factory.mktemp("segexp"), fm_root, "segmentation", seed=2)


@pytest.fixture(scope="module")
def seg_files(seg_run) -> dict[str, Path]:
    checkpoint, _ = seg_run
    files = {}
    for name, package in FILE_RUNTIMES.items():
        if importlib.util.find_spec(package) is None:
            continue
        out = checkpoint.parent / f"seg{registry.get(name).suffix}"
        argv = ["export", "--checkpoint", checkpoint, "--format", name, "--resolution", "64", "64", "--output", out]
        assert main([str(a) for a in argv]) == 0, name
        files[name] = out
    return files


def test_exported_semantic_fpn_scores_as_the_checkpoint(capsys, seg_run, seg_files):
    checkpoint, data = seg_run
    code, out, err = _run(capsys, "seg", "eval", "--checkpoint", checkpoint, "--data", data, "--bootstrap", "0",
                          "--json")  # fmt: skip
    assert code == 0, err
    reference = json.loads(out)
    assert {"onnx", "openvino"} <= set(seg_files)
    for name, path in seg_files.items():
        code, out, err = _run(capsys, "seg", "eval", "--checkpoint", path, "--data", data, "--bootstrap", "0",
                              "--json")  # fmt: skip
        assert code == 0, (name, err)
        result = json.loads(out)
        assert result["images"] == reference["images"] == 3
        for key in ("mIoU", "mAcc", "aAcc"):  # fp32 files: the same labels, to a flipped near-tie pixel at most
            assert result[key] == pytest.approx(reference[key], abs=0.05), (name, key)


def test_exported_semantic_fpn_metadata_and_predict(capsys, seg_run, seg_files, tmp_path):
    _, data = seg_run
    path = seg_files["onnx"]
    meta = registry.for_path(path).read_metadata(path)
    assert meta["task"] == "segmentation" and meta["preprocess"]["input_size"] == [3, 64, 64]
    assert meta["class_names"][0] == "background" and meta["num_classes"] == len(meta["class_names"])
    assert meta["eval_args"]["scale"] == [64, 64]
    image = next((data / "images" / "validation").iterdir())
    code, out, err = _run(capsys, "seg", "predict", image, "--checkpoint", path, "--output", tmp_path / "o")
    assert code == 0, err
    assert (tmp_path / "o" / f"{image.stem}.png").is_file() and "classes" in out


def test_semantic_fpn_export_errors_are_one_line(capsys, seg_run, seg_files, tmp_path):
    checkpoint, data = seg_run
    image = data / "images" / "validation" / "000000.png"
    code, _, err = _run(capsys, "predict", image, "--checkpoint", seg_files["onnx"])
    assert code == 2 and "holds a segmentation model" in err and "rapidnet seg" in err and err.count("\n") == 1
    for extra, message in (([], "pass --resolution H W"), (["--resolution", "48", "48"], "divisible by 32")):
        code, _, err = _run(capsys, "export", "--checkpoint", checkpoint, "--output", tmp_path / "s.onnx", *extra)
        assert code == 2 and message in err and err.count("\n") == 1, err
    code, _, err = _run(capsys, "predict", data / "images" / "validation" / "000000.png", "--checkpoint",
                        checkpoint)  # fmt: skip
    assert code == 2 and err.count("\n") == 1


@pytest.mark.parametrize("runtime", ["onnx", "litert"])  # OpenVINO, ExecuTorch: benchmarks/dense_runtimes_check.py
def test_semantic_fpn_int8_scores_near_fp32(capsys, seg_run, tmp_path, runtime):
    """``rapidnet quantize`` of a Semantic FPN run: the runtime's own int8, scored by ``seg eval`` beside its fp32."""
    package = FILE_RUNTIMES[runtime]
    if importlib.util.find_spec(package) is None or (runtime == "openvino" and not importlib.util.find_spec("nncf")):
        pytest.skip(f"needs {package}")
    checkpoint, data = seg_run
    suffix = registry.get(runtime).suffix
    int8, fp32 = tmp_path / f"seg_int8{suffix}", tmp_path / f"seg_fp32{suffix}"
    code, out, err = _run(capsys, "quantize", "--checkpoint", checkpoint, "--calib", data / "images" / "training",
                          "--resolution", "64", "64", "--output", int8, "--save-fp32", fp32)  # fmt: skip
    assert code == 0, err
    report = json.loads(int8.with_suffix(".json").read_text())
    assert report["calibration"]["images"] == 6 and report["evaluation"] is None
    assert report["sizes_bytes"]["int8"] < report["sizes_bytes"]["fp32"]
    scores = []
    for path in (fp32, int8):
        code, out, err = _run(capsys, "seg", "eval", "--checkpoint", path, "--data", data, "--bootstrap", "0",
                              "--json")  # fmt: skip
        assert code == 0, err
        scores.append(json.loads(out))
    # a one-epoch model on three scenes: int8 labels most pixels as fp32 does
    assert abs(scores[0]["aAcc"] - scores[1]["aAcc"]) < 5.0, scores
    calib = data / "images" / "training"
    code, _, err = _run(capsys, "quantize", "--checkpoint", checkpoint, "--calib", calib, "--resolution", "64", "64",
                        "--output", tmp_path / f"x{suffix}", "--eval-data", data)  # fmt: skip
    assert code == 2 and "seg eval" in err
