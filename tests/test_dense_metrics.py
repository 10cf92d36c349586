"""Dense metrics and overlays: COCOeval AP through CocoEvaluator, mIoU / mAcc / aAcc from a confusion matrix, and
the PNG overlays of predictions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from rapidnet.data.coco import CocoInstances
from rapidnet.metrics import CocoEvaluator, SegmentationMetrics
from rapidnet.visualize import class_colors, draw_instances, draw_semantic, save_png

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 48, 64


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory) -> CocoInstances:
    """Three images with rectangles and ellipses of two categories whose ids (4, 11) are not contiguous."""
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    (root / "val").mkdir()
    yy, xx = np.mgrid[0:H, 0:W]
    images, anns = [], []
    for i in range(3):
        Image.new("RGB", (W, H), (30 * i, 40, 50)).save(root / "val" / f"{i}.png")
        images.append({"id": 100 + i, "file_name": f"{i}.png", "height": H, "width": W})
        shapes = [
            (4, (yy >= 5 + i) & (yy < 25 + i) & (xx >= 3) & (xx < 20 + 2 * i)),
            (11, ((yy - 30) ** 2 / 80 + (xx - 40 + i) ** 2 / 150) < 1),
            (11, (yy >= 2) & (yy < 12) & (xx >= 45) & (xx < 60)),
        ]
        for cat, mask in shapes:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            rle["counts"] = rle["counts"].decode()
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 100 + i,
                    "category_id": cat,
                    "segmentation": rle,
                    "bbox": bbox,
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                }
            )
    data = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 4, "name": "square"}, {"id": 11, "name": "round"}],
    }
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return CocoInstances(root, "val", train=False)


def _perfect(dataset) -> tuple[list[dict], list[dict]]:
    """Predictions equal to the ground truth: boxes, labels, score 1 and masks as (N, 1, H, W) probabilities."""
    preds, targets = [], []
    for i in range(len(dataset)):
        _, target = dataset[i]
        preds.append(
            {
                "boxes": target["boxes"],
                "labels": target["labels"],
                "scores": torch.ones(len(target["labels"])),
                "masks": target["masks"][:, None].float(),
            }
        )
        targets.append(target)
    return preds, targets


def test_coco_ap_is_100_for_perfect_predictions(coco_set):
    evaluator = CocoEvaluator.from_dataset(coco_set)
    preds, targets = _perfect(coco_set)
    evaluator.update(preds[:2], targets[:2])
    evaluator.update(preds[2:], targets[2:])
    evaluator.update(preds[:1], targets[:1])  # a repeated image (DDP padding) counts once
    metrics = evaluator.compute()
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"):
        assert metrics[key] == pytest.approx(100.0), key
    assert evaluator.per_class() == {
        "bbox": {"square": pytest.approx(100.0), "round": pytest.approx(100.0)},
        "segm": {"square": pytest.approx(100.0), "round": pytest.approx(100.0)},
    }
    table = evaluator.table()
    assert "square" in table and "segm AP" in table and "100.00" in table


def test_coco_ap_drops_for_wrong_predictions(coco_set):
    preds, targets = _perfect(coco_set)
    shifted = [dict(p, boxes=p["boxes"] + torch.tensor([6.0, 6.0, 6.0, 6.0])) for p in preds]
    evaluator = CocoEvaluator.from_dataset(coco_set, iou_types=("bbox",))
    evaluator.update(shifted, targets)
    assert evaluator.compute()["bbox_AP"] < 60

    swapped = [dict(p, labels=3 - p["labels"]) for p in preds]  # labels 1 <-> 2: every class wrong
    evaluator = CocoEvaluator.from_dataset(coco_set)
    evaluator.update(swapped, targets)
    metrics = evaluator.compute()
    assert metrics["bbox_AP"] == pytest.approx(0.0) and metrics["segm_AP"] == pytest.approx(0.0)

    empty = [
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.long),
            "scores": torch.zeros(0),
            "masks": torch.zeros(0, 1, H, W),
        }
        for _ in preds
    ]
    evaluator = CocoEvaluator.from_dataset(coco_set)
    evaluator.update(empty, targets)
    assert evaluator.compute()["segm_AP"] == 0.0


def test_coco_predictions_on_resized_images_are_mapped_back(coco_set):
    preds, targets = _perfect(coco_set)
    half = []
    for p in preds:
        masks = torch.nn.functional.interpolate(p["masks"], size=(H // 2, W // 2), mode="bilinear")
        half.append(dict(p, boxes=p["boxes"] / 2, masks=masks))
    resized_targets = [dict(t, image_size=torch.tensor([H // 2, W // 2])) for t in targets]
    evaluator = CocoEvaluator.from_dataset(coco_set)
    evaluator.update(half, resized_targets)
    metrics = evaluator.compute()
    assert metrics["bbox_AP"] == pytest.approx(100.0) and metrics["segm_AP"] > 80


def test_miou_of_a_known_confusion_matrix():
    # rows = ground truth, columns = prediction
    confusion = np.array([[3, 1, 0], [0, 2, 2], [1, 0, 1]])
    gt, pred = [], []
    for g in range(3):
        for p in range(3):
            gt += [g] * confusion[g, p]
            pred += [p] * confusion[g, p]
    gt_map = torch.tensor([*gt, 255, 255]).view(1, 3, 4)  # two ignored pixels predicted as class 0
    pred_map = torch.tensor([*pred, 0, 0]).view(1, 3, 4)
    metrics = SegmentationMetrics(3, class_names=["a", "b", "c"])
    metrics.update(pred_map, gt_map)
    assert metrics.confusion.tolist() == confusion.tolist()
    # IoU = TP / (TP + FP + FN): a 3/5, b 2/5, c 1/4; accuracy per class 3/4, 2/4, 1/2; pixels 6/10
    result = metrics.compute()
    assert result["mIoU"] == pytest.approx(100 * (3 / 5 + 2 / 5 + 1 / 4) / 3)
    assert result["mAcc"] == pytest.approx(100 * (3 / 4 + 2 / 4 + 1 / 2) / 3)
    assert result["aAcc"] == pytest.approx(60.0)
    assert metrics.per_class()["c"] == {"IoU": pytest.approx(25.0), "Acc": pytest.approx(50.0)}
    assert "a" in metrics.table()


def test_segmentation_metrics_from_padded_logits():
    metrics = SegmentationMetrics(4, ignore_index=255)
    gt = torch.tensor([[0, 1], [2, 2]])
    logits = torch.full((1, 4, 4, 6), -5.0)  # a padded 4x6 batch whose image is 2x2 (pads predict class 3)
    logits[0, 3] = 5.0
    for (y, x), c in np.ndenumerate(gt.numpy()):
        logits[0, :, y, x] = -5.0
        logits[0, c, y, x] = 5.0
    metrics.update(logits, [{"sem_seg": gt, "image_size": torch.tensor([2, 2])}])
    result = metrics.compute()
    assert result["aAcc"] == 100.0 and result["mIoU"] == 100.0  # class 3: absent everywhere, left out (NaN)
    assert math.isnan(metrics.per_class()["3"]["IoU"])

    big = SegmentationMetrics(2)  # the label is larger than the (resized) image: logits are upsampled to it
    small_logits = torch.tensor([[[5.0, -5.0], [-5.0, -5.0]], [[-5.0, 5.0], [5.0, 5.0]]])[None]
    label = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    big.update(small_logits, [{"sem_seg": label}])
    assert big.compute()["aAcc"] > 80


def test_overlays(tmp_path):
    image = torch.full((3, H, W), 0.5)
    mask = torch.zeros(1, 1, H, W)
    mask[0, 0, 10:30, 10:40] = 0.9
    pred = {
        "boxes": torch.tensor([[10.0, 10, 40, 30]]),
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.8]),
        "masks": mask,
    }
    out = draw_instances(image, pred, ["a", "b"])
    assert out.size == (W, H)
    arr = np.asarray(out)
    assert tuple(arr[20, 25]) != (128, 128, 128) and tuple(arr[45, 60]) == (128, 128, 128)
    hidden = draw_instances(image, pred, ["a", "b"], score_threshold=0.9)
    assert np.array_equal(np.asarray(hidden), np.full((H, W, 3), 128))

    label = torch.zeros(H, W, dtype=torch.long)
    label[:, 32:] = 1
    label[0, 0] = 255
    sem = draw_semantic(image, label, ["background", "thing"], transparent_classes=(0,))
    assert sem.width > W  # the legend strip
    sem_arr = np.asarray(sem)
    assert tuple(sem_arr[5, 5]) == (128, 128, 128)  # background left uncoloured
    expected = np.round(128 * 0.5 + np.array(class_colors(2)[1]) * 0.5)
    assert np.abs(sem_arr[5, 40].astype(int) - expected).max() <= 1
    path = save_png(sem, tmp_path / "out" / "overlay.png")
    assert Path(path).is_file() and Image.open(path).size == sem.size


def _ddp_worker(rank: int, world: int, init_file: str, coco_root: str, out_dir: str) -> None:
    """One process of a 2-process gloo group: each sees part of the data, then both synchronize and compute."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dataset = CocoInstances(coco_root, "val", train=False)
        preds, targets = _perfect(dataset)
        evaluator = CocoEvaluator.from_dataset(dataset)
        mine = [0, 1] if rank == 0 else [1, 2]  # image 1 on both ranks, as a padding sampler does
        evaluator.update([preds[i] for i in mine], [targets[i] for i in mine])
        seg = SegmentationMetrics(2)
        seg.update(torch.tensor([[rank, 1]]), torch.tensor([[0, 1]]))  # rank 0 right twice, rank 1 once
        result = {**evaluator.compute(), **seg.compute(), "images": len(evaluator._results)}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_evaluators_synchronize_across_processes(coco_set, tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), str(coco_set.root), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]  # identical on every process
    assert results[0]["images"] == 3 and results[0]["bbox_AP"] == pytest.approx(100.0)
    assert results[0]["aAcc"] == pytest.approx(75.0)  # 3 of 4 pixels right over both processes
