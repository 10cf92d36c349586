"""The dense commands end to end on a tiny mosaic: ``rapidnet data mosaic``, ``det|seg train`` (checkpoints, logs,
resume), ``eval`` reproducing the logged metrics from the exported weights, ``predict`` overlays, one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DET_CONFIG, SEG_CONFIG
from rapidnet.cli.main import main

# pycocotools' RLE decoding predates numpy 2's copy keyword
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rapidnet {command}: error: "), err
    return lines[0]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return a == pytest.approx(b, abs=1e-6)


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory, fm_root) -> Path:
    out = tmp_path_factory.mktemp("mosaic") / "data"
    code = main(["data", "mosaic", "--out", str(out), "--fashion-mnist", str(fm_root), "--num-train", "6",
                 "--num-val", "3", "--num-dev", "0", "--image-size", "64", "--seed", "1", "--no-progress"])  # fmt: skip
    assert code == 0  # no dev split: the runs below choose their best epoch on val, as before dev splits
    return out


@pytest.fixture(scope="module")
def det_run(tmp_path_factory, mosaic) -> Path:
    folder = tmp_path_factory.mktemp("det")
    (folder / "det.yaml").write_text(DET_CONFIG)
    out = folder / "run"
    code = main(["det", "train", "--config", str(folder / "det.yaml"), "--data", str(mosaic), "--output", str(out),
                 "--limit-train", "4", "--no-progress"])  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, mosaic) -> Path:
    folder = tmp_path_factory.mktemp("seg")
    (folder / "seg.yaml").write_text(SEG_CONFIG)
    out = folder / "run"
    code = main(["seg", "train", "--config", str(folder / "seg.yaml"), "--data", str(mosaic), "--output", str(out),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    return out


# ---- data mosaic ---------------------------------------------------------------------------------------------------


def test_data_mosaic_writes_both_formats_and_refuses_bad_output(capsys, mosaic, fm_root, tmp_path):
    coco = json.loads((mosaic / "annotations" / "instances_train.json").read_text())
    assert len(coco["images"]) == 6 and coco["annotations"]
    assert len(list((mosaic / "images" / "validation").glob("*.png"))) == 3
    assert Image.open(mosaic / "annotations" / "validation" / "000000.png").size == (64, 64)

    out = tmp_path / "m"
    args = ("data", "mosaic", "--out", out, "--fashion-mnist", fm_root, "--num-train", "2", "--num-val", "1",
            "--num-dev", "2", "--image-size", "32", "--no-progress")  # fmt: skip
    assert _run(capsys, *args)[0] == 0
    assert json.loads((out / "meta.json").read_text())["config"]["style"] == "black"  # the default
    code, _, err = _run(capsys, *args)
    assert code == 2 and "overwrite" in _one_line_error(err, "data")
    code, out_text, _ = _run(capsys, *args, "--overwrite", "--style", "tinted")
    assert code == 0 and "2 train / 1 val / 2 dev" in out_text and "tinted" in out_text
    assert json.loads((out / "meta.json").read_text())["config"]["style"] == "tinted"

    empty = tmp_path / "no-fashion-mnist"
    empty.mkdir()
    code, _, err = _run(capsys, "data", "mosaic", "--out", tmp_path / "m2", "--fashion-mnist", empty, "--no-progress")
    assert code == 2
    _one_line_error(err, "data")
    assert not (tmp_path / "m2").exists()


# ---- detection -----------------------------------------------------------------------------------------------------


def test_det_train_writes_checkpoints_and_logs(det_run):
    for name in ("last.pt", "best.pt", "model_best.safetensors", "config.yaml", "log.jsonl", "steps.jsonl"):
        assert (det_run / name).is_file(), name
    (record,) = _records(det_run)
    assert record["epoch"] == 1 and record["step"] == 2  # 4 images, batch 2
    assert math.isfinite(record["train_loss"]) and record["train_loss"] > 0
    assert {"val_bbox_AP", "val_segm_AP", "best_bbox_AP"} <= set(record)
    assert len((det_run / "steps.jsonl").read_text().splitlines()) == 2


MASK_RCNN_LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def test_det_train_logs_the_five_mask_rcnn_losses(det_run):
    """Each of torchvision's five terms beside the total: per step, as epoch means, and in TensorBoard's events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = [json.loads(line) for line in (det_run / "steps.jsonl").read_text().splitlines()]
    for r in steps:
        assert [k for k in r if k.startswith("loss_")] == list(MASK_RCNN_LOSSES)
        assert r["loss"] == pytest.approx(sum(r[k] for k in MASK_RCNN_LOSSES), rel=1e-5)
    (record,) = _records(det_run)
    for key in MASK_RCNN_LOSSES:  # two steps of 2 images: the epoch mean is the mean of the two
        assert record[f"train_{key}"] == pytest.approx((steps[0][key] + steps[1][key]) / 2, rel=1e-9)
    assert record["train_loss"] == pytest.approx(sum(record[f"train_{k}"] for k in MASK_RCNN_LOSSES), rel=1e-5)
    events = EventAccumulator(str(det_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/{k}" for k in MASK_RCNN_LOSSES} | {"epoch/val_bbox_AP", "epoch/train_loss_mask"} <= tags
    assert [e.step for e in events.Scalars("train/loss_mask")] == [1, 2]


def test_plot_draws_the_named_losses(capsys, det_run, tmp_path):
    """``rapidnet plot`` adds a panel of the named losses (per step, from steps.jsonl); a log without them keeps the
    two panels."""
    from rapidnet.cli.plot import loss_terms
    from rapidnet.engine import read_jsonl

    terms = loss_terms(read_jsonl(det_run / "log.jsonl"), read_jsonl(det_run / "steps.jsonl"))
    assert list(terms["terms"]) == list(MASK_RCNN_LOSSES) and terms["x"] == [1, 2]
    epoch_terms = loss_terms(read_jsonl(det_run / "log.jsonl"), [])
    assert list(epoch_terms["terms"]) == list(MASK_RCNN_LOSSES) and epoch_terms["xlabel"] == "epoch"
    code, out, _ = _run(capsys, "plot", det_run, "-o", tmp_path / "det.png")
    assert code == 0 and "det.png" in out
    plain = tmp_path / "plain"
    plain.mkdir()
    lines = [json.dumps({k: v for k, v in r.items() if not k.startswith("train_loss_")}) for r in _records(det_run)]
    (plain / "log.jsonl").write_text("\n".join(lines) + "\n")
    assert _run(capsys, "plot", plain)[0] == 0
    three, two = Image.open(tmp_path / "det.png"), Image.open(plain / "curves.png")
    assert three.size[1] == two.size[1] and three.size[0] == pytest.approx(1.5 * two.size[0], abs=2)
    assert np.asarray(three.convert("L"))[:, two.size[0] :].std() > 0  # the third panel is drawn


def test_train_commands_refuse_a_config_for_another_task(capsys, mosaic, tmp_path):
    """``rapidnet train`` with a detection or segmentation config, and a dense command with the other's config: one
    line naming the command that trains it, exit 2, nothing written."""
    (tmp_path / "det.yaml").write_text(DET_CONFIG)
    (tmp_path / "seg.yaml").write_text(SEG_CONFIG)
    for command, config, right in (
        (["train"], "det.yaml", "rapidnet det train"),
        (["train"], "seg.yaml", "rapidnet seg train"),
        (["det", "train"], "seg.yaml", "rapidnet seg train"),
        (["seg", "train"], "det.yaml", "rapidnet det train"),
    ):
        out = tmp_path / f"run-{command[0]}-{config}"
        code, _, err = _run(capsys, *command, "--config", tmp_path / config, "--data", mosaic, "--output", out)
        assert code == 2 and f"'{right}'" in _one_line_error(err, command[0]), (command, config)
        assert not out.exists()


def test_det_eval_reproduces_logged_metrics(capsys, det_run, mosaic):
    (record,) = _records(det_run)
    for checkpoint in ("model_best.safetensors", "last.pt"):
        code, out, _ = _run(capsys, "det", "eval", "--checkpoint", det_run / checkpoint, "--data", mosaic, "--json")
        assert code == 0
        metrics = json.loads(out)
        assert metrics["images"] == 3
        for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50"):
            assert _same(metrics[key], record[f"val_{key}"]), key


def test_det_eval_size_overrides_the_runs_test_size(capsys, det_run, mosaic, monkeypatch):
    """``det eval --size`` reads the images at another shorter side than the run's (stored: none, so min_size);
    a size below 1 is one line."""
    import rapidnet.tasks._dense as dense_tasks

    sizes: list = []
    real = dense_tasks.evaluate_dense
    monkeypatch.setattr(dense_tasks, "evaluate_dense", lambda m, *a: sizes.append(m.transform.test_size) or real(m, *a))
    for extra in ([], ["--size", "96"]):
        code, out, _ = _run(capsys, "det", "eval", "--checkpoint", det_run / "last.pt", "--data", mosaic, "--json",
                            "--bootstrap", "0", *extra)  # fmt: skip
        assert code == 0 and 0 <= json.loads(out)["bbox_AP"] <= 100
    assert sizes == [None, 96]
    code, _, err = _run(capsys, "det", "eval", "--checkpoint", det_run / "last.pt", "--data", mosaic, "--size", 0)
    assert code == 2 and "--size" in _one_line_error(err, "det")


def test_det_predict_writes_overlays(capsys, det_run, mosaic, tmp_path):
    images = [mosaic / "val" / "000000.png", mosaic / "val" / "000001.png"]
    code, out, _ = _run(capsys, "det", "predict", *images, "--checkpoint", det_run / "model_best.safetensors",
                        "--output", tmp_path / "overlays", "--score-threshold", "0")  # fmt: skip
    assert code == 0 and out.count("object(s)") == 2
    for image in images:
        overlay = Image.open(tmp_path / "overlays" / image.name)
        assert overlay.size[0] >= 256  # small images are enlarged for readable captions
        assert np.asarray(overlay.convert("RGB")).std() > 0


def test_det_resume_continues_the_run(capsys, det_run, mosaic, tmp_path):
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(det_run, run)
    code, out, _ = _run(capsys, "det", "train", "--resume", run / "last.pt", "--epochs", "2", "--no-progress")
    assert code == 0, out
    first, second = _records(run)
    assert first == _records(det_run)[0]
    assert second["epoch"] == 2 and second["step"] == 4


def test_det_errors_are_one_line(capsys, det_run, mosaic, tmp_path):
    code, _, err = _run(capsys, "det", "train", "--data", mosaic)
    assert code == 2 and "--config" in _one_line_error(err, "det")
    bad = tmp_path / "bad.yaml"
    bad.write_text(DET_CONFIG.replace("min_size: 64", "min_sise: 64"))
    code, _, err = _run(capsys, "det", "train", "--config", bad, "--data", mosaic, "--output", tmp_path / "r")
    assert code == 2 and "min_sise" in _one_line_error(err, "det")
    code, _, err = _run(capsys, "seg", "eval", "--checkpoint", det_run / "model_best.safetensors", "--data", mosaic)
    assert code == 2 and "detection" in _one_line_error(err, "seg")
    code, _, err = _run(capsys, "det", "eval", "--checkpoint", det_run / "last.pt", "--data", tmp_path / "missing")
    assert code == 2 and "not found" in _one_line_error(err, "det")
    text = tmp_path / "not-an-image.png"
    text.write_text("hello")
    code, _, err = _run(capsys, "det", "predict", text, "--checkpoint", det_run / "last.pt", "--output", tmp_path)
    assert code == 2 and "not-an-image.png" in _one_line_error(err, "det")


# ---- segmentation --------------------------------------------------------------------------------------------------


def test_seg_train_eval_and_predict(capsys, seg_run, mosaic, tmp_path):
    for name in ("last.pt", "best.pt", "model_best.safetensors", "log.jsonl"):
        assert (seg_run / name).is_file(), name
    (record,) = _records(seg_run)
    assert record["step"] == 3 and math.isfinite(record["train_loss"])
    assert 0 < record["val_aAcc"] <= 100

    code, out, _ = _run(capsys, "seg", "eval", "--checkpoint", seg_run / "model_best.safetensors", "--data", mosaic,
                        "--json")  # fmt: skip
    assert code == 0
    metrics = json.loads(out)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert _same(metrics[key], record[f"val_{key}"]), key

    code, out, _ = _run(capsys, "seg", "eval", "--checkpoint", seg_run / "last.pt", "--data", mosaic)
    assert code == 0 and "background" in out and f"mIoU {record['val_mIoU']:.2f}" in out

    image = mosaic / "images" / "validation" / "000002.png"
    code, out, _ = _run(capsys, "seg", "predict", image, "--checkpoint", seg_run / "model_best.safetensors",
                        "--output", tmp_path / "o")  # fmt: skip
    assert code == 0 and "classes" in out
    overlay = Image.open(tmp_path / "o" / "000002.png")
    assert overlay.size[0] >= 256


def test_seg_test_scale_resizes_evaluation_only_and_eval_scale_overrides_it(capsys, seg_run, mosaic, monkeypatch):
    """``task.test_scale`` sets the evaluation resize (stored with the weights) and leaves training's rescale alone;
    without it evaluation uses ``scale``; ``seg eval --scale`` replaces the stored one; a bad scale is one line."""
    import yaml

    import rapidnet.tasks._dense as dense_tasks
    from rapidnet.config import config_from_dict
    from rapidnet.tasks._dense import load_dense_model
    from rapidnet.tasks.segmentation import SegmentationTask

    tree = yaml.safe_load(SEG_CONFIG)
    tree["data"]["path"] = str(mosaic)
    plain = SegmentationTask(config_from_dict(tree))
    train, val = plain._open_data()
    assert train.transforms.scale == val.transforms.scale == (64, 64)
    tree["task"]["test_scale"] = [96, 80]
    task = SegmentationTask(config_from_dict(tree))
    train, val = task._open_data()
    assert train.transforms.scale == (64, 64) and val.transforms.scale == (96, 80)
    image, target = val[0]
    assert image.shape[-2:] == (80, 80) and target["sem_seg"].shape[-2:] == (64, 64)  # fits 96x80; label unresized
    task.classes = list(train.classes)
    assert task.eval_args()["scale"] == [96, 80]
    assert load_dense_model(seg_run / "model_best.safetensors", "segmentation")[1]["eval_args"]["scale"] == [64, 64]

    seen: list = []
    real = dense_tasks.build_dense_eval_dataset
    monkeypatch.setattr(dense_tasks, "build_dense_eval_dataset", lambda *a: seen.append(a[2]["scale"]) or real(*a))
    code, out, _ = _run(capsys, "seg", "eval", "--checkpoint", seg_run / "last.pt", "--data", mosaic, "--scale", 96,
                        96, "--json")  # fmt: skip
    assert code == 0 and seen == [[96, 96]] and 0 < json.loads(out)["aAcc"] <= 100
    code, _, err = _run(capsys, "seg", "eval", "--checkpoint", seg_run / "last.pt", "--data", mosaic, "--scale", 0,
                        96)  # fmt: skip
    assert code == 2 and "--scale" in _one_line_error(err, "seg")


@pytest.mark.parametrize("kind, config, metric", [("seg", SEG_CONFIG, "mIoU"), ("det", DET_CONFIG, "bbox_AP")])
def test_dense_train_under_torchrun_evaluates_each_image_once(kind, config, metric, mosaic, tmp_path, capsys, torchrun):
    """``det|seg train`` in 2 processes (gloo): rank 0 alone writes the log, an epoch is the global batches once,
    and the distributed evaluation (3 images: shares of 2 and 1, no padding) matches a 1-process ``eval``."""
    (tmp_path / "config.yaml").write_text(config)
    out = tmp_path / "run"
    proc = torchrun(kind, "train", "--config", tmp_path / "config.yaml", "--data", mosaic, "--output", out,
                    "--batch-size", 1, "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    (record,) = _records(out)
    assert record["step"] == 6 // (1 * 2)  # 6 scenes, batch 1 per process
    code, text, _ = _run(capsys, kind, "eval", "--checkpoint", out / "model_best.safetensors", "--data", mosaic,
                         "--json")  # fmt: skip
    metrics = json.loads(text)
    assert code == 0 and metrics["images"] == 3
    for key in [k for k in metrics if k != "images"]:
        assert _same(metrics[key], record[f"val_{key}"]), key


# ---- selection on a dev split, val reported --------------------------------------------------------------------

NUM_DEV = 4
INTERVAL = r"\[\d+\.\d, \d+\.\d\]"


@pytest.fixture(scope="module")
def dev_mosaic(tmp_path_factory, fm_root) -> Path:
    out = tmp_path_factory.mktemp("dev-mosaic") / "data"
    code = main(["data", "mosaic", "--out", str(out), "--fashion-mnist", str(fm_root), "--num-train", "6",
                 "--num-val", "3", "--num-dev", str(NUM_DEV), "--image-size", "64", "--seed", "1",
                 "--no-progress"])  # fmt: skip
    assert code == 0
    return out


def test_seg_train_selects_on_dev_and_reads_val_only_for_the_final_report(capsys, dev_mosaic, tmp_path, monkeypatch):
    """Every evaluated epoch reads the dev split and never val; model_best is the best dev epoch (scripted here: epoch
    2 of 3); after the run val is read once for the best weights (best.pt) and once for the final ones, and the report
    record holds what ``seg eval`` gives for model_best.safetensors and last.pt, intervals included."""
    import re

    from rapidnet.data.ade20k import ADE20KSegmentation
    from rapidnet.engine.callbacks import FinalReport
    from rapidnet.tasks.segmentation import SegmentationTask

    reads: list[str] = []
    get_item, report, evaluate = ADE20KSegmentation.__getitem__, FinalReport.on_fit_end, SegmentationTask.evaluate
    monkeypatch.setattr(ADE20KSegmentation, "__getitem__", lambda ds, i: reads.append(ds.split) or get_item(ds, i))
    monkeypatch.setattr(FinalReport, "on_fit_end", lambda cb, tr, res: reads.append("report") or report(cb, tr, res))
    dev_scores = iter([50.0, 70.0, 60.0, 55.0])  # the last one for the resumed epoch
    monkeypatch.setattr(SegmentationTask, "evaluate", lambda task, m: {**evaluate(task, m), "mIoU": next(dev_scores)})
    (tmp_path / "seg.yaml").write_text(SEG_CONFIG)
    out = tmp_path / "run"
    code, text, _ = _run(capsys, "seg", "train", "--config", tmp_path / "seg.yaml", "--data", dev_mosaic, "--output",
                         out, "--epochs", 3, "--no-progress")  # fmt: skip
    assert code == 0
    cut = reads.index("report")
    assert reads[:cut].count("dev") == 3 * NUM_DEV and set(reads[:cut]) == {"training", "dev"}
    assert reads[cut + 1 :] == ["validation"] * (2 * 3)  # the best and the final weights, 3 scenes each

    *epochs, final = _records(out)
    assert [r["dev_mIoU"] for r in epochs] == [50.0, 70.0, 60.0] and [r["best_epoch"] for r in epochs] == [1, 2, 2]
    assert not [k for r in epochs for k in r if k.startswith("val_")]
    assert (final["report"], final["selected_on"], final["best_epoch"], final["epoch"]) == ("val", "dev", 2, 3)
    for weights, name in (("model_best.safetensors", "best"), ("last.pt", "final")):
        code, shown, _ = _run(capsys, "seg", "eval", "--checkpoint", out / weights, "--data", dev_mosaic, "--json")
        metrics = json.loads(shown)
        assert code == 0 and metrics["images"] == 3
        for key in ("mIoU", "mAcc", "aAcc", "mIoU_ci", "aAcc_ci"):
            assert _same(metrics[key], final[f"val_{name}_{key}"]), (name, key)
        low, high = metrics["mIoU_ci"]
        assert low <= metrics["mIoU"] <= high
    assert "dev mIoU 50.00" in text and "best dev mIoU 70.00 at epoch 2" in text
    assert re.search(rf"val, best weights \(epoch 2\): mIoU \d+\.\d+ {INTERVAL}", text)
    assert re.search(rf"val, final weights \(epoch 3\): mIoU \d+\.\d+ {INTERVAL}", text)
    code, shown, _ = _run(capsys, "seg", "eval", "--checkpoint", out / "last.pt", "--data", dev_mosaic)
    assert code == 0 and re.search(rf"mIoU \d+\.\d\d {INTERVAL}  mAcc", shown) and "val split, 3 images" in shown

    # a resume to more epochs drops the old report and reports again at its end
    code, _, _ = _run(capsys, "seg", "train", "--resume", out / "last.pt", "--epochs", 4, "--no-progress")
    records = _records(out)
    assert code == 0 and [("report" in r, r["epoch"]) for r in records] == [(False, 1), (False, 2), (False, 3),
                                                                              (False, 4), (True, 4)]  # fmt: skip
    assert records[-1]["best_epoch"] == 2 and _same(records[-1]["val_best_mIoU"], final["val_best_mIoU"])


def test_det_train_selects_on_dev_and_reports_val_with_intervals(capsys, dev_mosaic, tmp_path):
    import re

    (tmp_path / "det.yaml").write_text(DET_CONFIG)
    out = tmp_path / "run"
    code, text, _ = _run(capsys, "det", "train", "--config", tmp_path / "det.yaml", "--data", dev_mosaic, "--output",
                         out, "--limit-train", 4, "--no-progress")  # fmt: skip
    assert code == 0 and "dev images 4" in text and "box AP on dev" in text
    epoch, final = _records(out)
    assert {"dev_bbox_AP", "best_bbox_AP"} <= set(epoch) and "dev_bbox_AP_ci" not in epoch
    assert "dev_segm_AP" not in epoch and "val_best_segm_AP" in final  # dev picks by boxes; val scores masks too
    assert final["best_epoch"] == 1 and final["val_best_bbox_AP"] == final["val_final_bbox_AP"]  # scored once
    code, shown, _ = _run(capsys, "det", "eval", "--checkpoint", out / "model_best.safetensors", "--data", dev_mosaic,
                          "--json")  # fmt: skip
    metrics = json.loads(shown)
    for key in ("bbox_AP", "bbox_AP50", "segm_AP", "bbox_AP_ci", "segm_AP_ci"):
        assert _same(metrics[key], final[f"val_best_{key}"]), key
    code, shown, _ = _run(capsys, "det", "eval", "--checkpoint", out / "model_best.safetensors", "--data", dev_mosaic,
                          "--split", "dev", "--bootstrap", 0, "--json")  # fmt: skip
    metrics = json.loads(shown)
    assert code == 0 and metrics["images"] == NUM_DEV and "bbox_AP_ci" not in metrics
    assert _same(metrics["bbox_AP"], epoch["dev_bbox_AP"]) and "segm_AP" in metrics
    code, _, _ = _run(capsys, "det", "train", "--config", tmp_path / "det.yaml", "--data", dev_mosaic,
                      "--output", tmp_path / "masks", "--limit-train", 4, "--no-progress",
                      "--set", "task.dev_masks=true")  # fmt: skip
    with_masks = _records(tmp_path / "masks")[0]
    assert code == 0 and _same(with_masks["dev_segm_AP"], metrics["segm_AP"])
    assert _same(with_masks["dev_bbox_AP"], epoch["dev_bbox_AP"])  # the same training: masks change no box
    code, shown, _ = _run(capsys, "det", "eval", "--checkpoint", out / "last.pt", "--data", dev_mosaic)
    assert code == 0 and re.search(rf"bbox_AP \d+\.\d\d {INTERVAL}  segm_AP \d+\.\d\d {INTERVAL}", shown)


def test_dev_split_mismatches_are_one_line_errors(capsys, dev_mosaic, mosaic, tmp_path):
    """select_on: dev without a dev split, a dev split missing files, of another image size or with other classes,
    and eval --split dev without one: one line each, exit 2."""
    import shutil

    (tmp_path / "seg.yaml").write_text(SEG_CONFIG)
    (tmp_path / "det.yaml").write_text(DET_CONFIG)

    def train(kind: str, data: Path, *extra: str) -> str:
        code, _, err = _run(capsys, kind, "train", "--config", tmp_path / f"{kind}.yaml", "--data", data, "--output",
                            tmp_path / "never", *extra)  # fmt: skip
        assert code == 2 and not (tmp_path / "never" / "last.pt").exists()
        return _one_line_error(err, kind)

    assert "select_on is dev" in train("seg", mosaic, "--set", "task.select_on=dev")
    assert "--set task.select_on=test: task.select_on must be one of dev, val, or null, got 'test'" in train(
        "det", dev_mosaic, "--set", "task.select_on=test"
    )
    assert "--set task.dev_masks=yes please: task.dev_masks must be bool, got 'yes please'" in train(
        "det", dev_mosaic, "--set", "task.dev_masks=yes please"
    )
    missing = tmp_path / "missing"
    shutil.copytree(dev_mosaic, missing)
    shutil.rmtree(missing / "annotations" / "dev")
    assert "missing" in train("seg", missing)
    small = tmp_path / "small"
    shutil.copytree(dev_mosaic, small)
    for path in (small / "images" / "dev").glob("*.png"):
        path.unlink()  # a hard link to dev/: write a new file
        Image.new("RGB", (32, 32)).save(path)
    assert "32x32" in train("seg", small)
    renamed = tmp_path / "renamed"
    shutil.copytree(dev_mosaic, renamed)
    coco = json.loads((renamed / "annotations" / "instances_dev.json").read_text())
    coco["categories"][0]["name"] = "Tee"
    (renamed / "annotations" / "instances_dev.json").write_text(json.dumps(coco))
    assert "other classes" in train("det", renamed)
    code, _, err = _run(capsys, "seg", "eval", "--checkpoint", tmp_path / "none.pt", "--data", mosaic, "--split", "dev")
    assert code == 2 and "no dev split" in _one_line_error(err, "seg")

    # select_on: val keeps selecting on val beside a dev split, and then does not even look at a broken one
    import yaml

    from rapidnet.config import config_from_dict
    from rapidnet.tasks.segmentation import SegmentationTask

    for data, select_on, opened in ((dev_mosaic, None, True), (dev_mosaic, "val", False), (missing, "val", False)):
        tree = yaml.safe_load(SEG_CONFIG)
        tree["data"]["path"] = str(data)
        tree["task"]["select_on"] = select_on
        task = SegmentationTask(config_from_dict(tree))
        task.train_set, task.val_set = task._open_data()
        assert (task._open_dev() is not None) == opened, (data, select_on)


# ---- configs -------------------------------------------------------------------------------------------------------

DENSE_CONFIGS = sorted(
    p
    for pattern in ("coco_*.yaml", "ade20k_*.yaml", "mosaic_*.yaml")
    for p in (Path(__file__).parent.parent / "configs").glob(pattern)
)


@pytest.mark.parametrize("path", DENSE_CONFIGS, ids=lambda p: p.stem)
def test_shipped_dense_configs_validate(path):
    from rapidnet.config import load_config
    from rapidnet.tasks import TASKS

    cfg = load_config(path)
    task = TASKS[cfg.task["name"]](cfg)  # checks the task: section
    assert not cfg.ema.enabled
    if path.stem.startswith("mosaic_"):
        assert cfg.model.name in path.stem and cfg.model.name in task.opts.backbone_checkpoint


def test_dense_configs_are_found():
    assert len(DENSE_CONFIGS) == 8


def test_backbone_lr_scale_sets_the_body_apart_through_the_schedule():
    """``task.backbone_lr_scale`` trains the pretrained body at that fraction of the heads' rate, at every step of
    timm's schedule; weight decay still skips norms and biases; a non-positive factor is a one-line error."""
    import yaml
    from timm.scheduler import PolyLRScheduler

    from rapidnet.config import config_from_dict
    from rapidnet.errors import ConfigError
    from rapidnet.models import semantic_fpn
    from rapidnet.tasks.segmentation import SegmentationTask

    tree = yaml.safe_load(SEG_CONFIG)
    tree["task"]["backbone_lr_scale"] = 0.1
    task = SegmentationTask(config_from_dict(tree))
    model = semantic_fpn(backbone="rapidnet_ti", num_classes=11, fpn_channels=32, head_channels=32)
    optimizer = task.build_optimizer(model, lr=1e-3)
    body = {id(p) for p in model.backbone.body.parameters()}
    seen = set()
    for group in optimizer.param_groups:
        in_body = {id(p) in body for p in group["params"]}
        assert len(in_body) == 1  # a group is all body or all heads
        assert group["lr_scale"] == (0.1 if in_body.pop() else 1.0)
        assert (group["weight_decay"] > 0) == all(p.ndim > 1 for p in group["params"])
        seen.update(id(p) for p in group["params"])
    assert seen == {id(p) for p in model.parameters() if p.requires_grad}
    assert optimizer.param_groups[0]["lr_scale"] == 1.0  # the logged lr is the heads'
    scheduler = PolyLRScheduler(optimizer, t_initial=10, power=0.9, t_in_epochs=False)
    scheduler.step_update(5)
    rates = {g["lr_scale"]: g["lr"] for g in optimizer.param_groups}
    assert 0 < rates[1.0] < 1e-3 and rates[0.1] == pytest.approx(0.1 * rates[1.0])

    tree["task"]["backbone_lr_scale"] = 1.0
    plain = SegmentationTask(config_from_dict(tree))
    assert plain.param_groups(model, 1e-3) is None
    tree["task"]["backbone_lr_scale"] = 0.0
    with pytest.raises(ConfigError, match="backbone_lr_scale"):
        SegmentationTask(config_from_dict(tree)).build_optimizer(model, lr=1e-3)
