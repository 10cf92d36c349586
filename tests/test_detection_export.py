"""A Mask R-CNN run's checkpoint exported to ONNX Runtime and OpenVINO with its post-processing, then scored and
drawn by ``rapidnet det eval|predict`` from the file as from the checkpoint (:mod:`rapidnet.deploy.detection`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import rapidnet
from conftest import run_cli, tiny_dense_run
from rapidnet.cli._dense import _load, _read_image
from rapidnet.cli.main import main
from rapidnet.deploy import registry

# pycocotools' RLE decoding predates numpy 2's copy keyword
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FILE_RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino"}


_run = run_cli


@pytest.fixture(scope="module")
def det_run(tmp_path_factory, fm_root) -> tuple[Path, Path]:
    return tiny_dense_run(tmp_path_factory.mktemp("detexp"), fm_root, "detection")


@pytest.fixture(scope="module")
def det_files(det_run) -> dict[str, Path]:
    """The run exported through the CLI at its default size (the test size, 64x64), checked against PyTorch."""
    checkpoint, _ = det_run
    files = {}
    for name, package in FILE_RUNTIMES.items():
        if importlib.util.find_spec(package) is None:
            continue
        out = checkpoint.parent / f"det{registry.get(name).suffix}"
        assert main(["export", "--checkpoint", str(checkpoint), "--format", name, "--output", str(out)]) == 0, name
        files[name] = out
    return files


def test_exported_mask_rcnn_scores_as_the_checkpoint(capsys, det_run, det_files):
    checkpoint, data = det_run
    code, out, err = _run(capsys, "det", "eval", "--checkpoint", checkpoint, "--data", data, "--bootstrap", "0",
                          "--json")  # fmt: skip
    assert code == 0, err
    reference = json.loads(out)
    assert set(det_files) == set(FILE_RUNTIMES)
    for name, path in det_files.items():
        code, out, err = _run(capsys, "det", "eval", "--checkpoint", path, "--data", data, "--bootstrap", "0",
                              "--json")  # fmt: skip
        assert code == 0, (name, err)
        result = json.loads(out)
        assert result["images"] == reference["images"] == 3
        for key in ("bbox_AP", "segm_AP", "bbox_AP50"):
            assert result[key] == pytest.approx(reference[key], abs=0.3), (name, key)


def test_exported_mask_rcnn_detections_match_the_checkpoint(det_run, det_files):
    """A 1-epoch run's AP is near zero, so the detections themselves are compared: the same boxes, scores, labels
    and pasted masks, image by image, as the PyTorch model's."""
    checkpoint, data = det_run
    model, checkpoint_meta = rapidnet.load(checkpoint, task="detection")
    images = [_read_image(str(p)) for p in sorted((data / "val").glob("*.png"))]
    assert images
    with torch.no_grad():
        expected = model.eval()(images)
    assert sum(len(e["scores"]) for e in expected) > 0  # else there would be nothing to compare
    for name, path in det_files.items():
        exported, meta = _load(str(path), "detection", torch.device("cpu"))
        assert (
            meta["class_names"] == checkpoint_meta["class_names"] and meta["eval_args"] == checkpoint_meta["eval_args"]
        )
        for got, ref in zip(exported(images), expected, strict=True):
            assert got["labels"].dtype == torch.int64 and got["masks"].shape == ref["masks"].shape, name
            assert torch.equal(got["labels"], ref["labels"]), name
            torch.testing.assert_close(got["scores"], ref["scores"], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got["boxes"], ref["boxes"], atol=1e-3, rtol=1e-4)
            torch.testing.assert_close(got["masks"], ref["masks"], atol=1e-3, rtol=1e-3)


def test_exported_mask_rcnn_metadata_predict_and_errors(capsys, det_run, det_files, tmp_path):
    checkpoint, data = det_run
    path = det_files["onnx"]
    meta = registry.for_path(path).read_metadata(path)
    assert meta["task"] == "detection" and meta["preprocess"]["input_size"] == [3, 64, 64]
    assert meta["outputs"] == ["boxes", "scores", "labels", "masks"] and meta["num_classes"] == len(meta["class_names"])
    assert meta["transform"]["min_size"] == [64] and meta["transform"]["max_size"] == 64
    image = sorted((data / "val").glob("*.png"))[0]
    for name, file in det_files.items():
        code, out, err = _run(capsys, "det", "predict", image, "--checkpoint", file, "--output", tmp_path / name,
                              "--score-threshold", "0.05")  # fmt: skip
        assert code == 0, err
        assert (tmp_path / name / f"{image.stem}.png").is_file() and "object(s)" in out
    # an evaluation size the file cannot hold, a size the network cannot take: one line each
    code, _, err = _run(capsys, "det", "eval", "--checkpoint", path, "--data", data, "--size", "128", "--bootstrap",
                        "0")  # fmt: skip
    assert code == 2 and "--resolution" in err and err.count("\n") == 1, err
    code, _, err = _run(capsys, "export", "--checkpoint", checkpoint, "--resolution", "48", "48", "--output",
                        tmp_path / "d.onnx")  # fmt: skip
    assert code == 2 and "divisible by 32" in err and err.count("\n") == 1, err
