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
    assert results[0]["bbox_AP_ci"] == [100.0, 100.0] and len(results[0]["aAcc_ci"]) == 2  # intervals over both


# ---- bootstrap intervals -------------------------------------------------------------------------------------------


def _synthetic_coco(num_images: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """Ground truth of ``num_images`` images (0-5 boxes of 4 categories, some crowds) and jittered, partly mislabelled
    detections with random scores, plus false alarms: AP far from 0 and 100."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, num_images + 1):
        images.append({"id": i, "height": 128, "width": 128})
        for _ in range(rng.integers(0, 6)):
            x, y, w, h = (*rng.uniform(0, 80, 2), *rng.uniform(10, 40, 2))
            cat = int(rng.integers(1, 5))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": int(rng.random() < 0.05)})  # fmt: skip
            for _ in range(rng.integers(0, 3)):
                jx, jy, jw, jh = rng.normal(0, 4, 4)
                label = cat if rng.random() < 0.8 else int(rng.integers(1, 5))
                dets.append({"image_id": i, "category_id": label, "score": float(rng.random()),
                             "bbox": [x + jx, y + jy, max(1.0, w + jw), max(1.0, h + jh)]})  # fmt: skip
        for _ in range(rng.integers(0, 4)):
            box = [*rng.uniform(0, 100, 2), *rng.uniform(5, 40, 2)]
            dets.append(
                {"image_id": i, "category_id": int(rng.integers(1, 5)), "bbox": box, "score": float(rng.random())}
            )
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, 5)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _cocoeval(gt: dict, dets: list[dict]):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes([dict(d) for d in dets]), "bbox")
        evaluator.params.imgIds = sorted(coco.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def test_ap_resampling_is_cocoevals_accumulate_with_image_multiplicities():
    """All-ones counts give COCOeval's AP / AP50 / AP75; integer counts give what COCOeval reports on a data set that
    holds each image that many times (crowds included)."""
    from rapidnet.metrics import coco_ap_resamples

    gt, dets = _synthetic_coco(40)
    evaluator = _cocoeval(gt, dets)
    assert 0.05 < evaluator.stats[0] < 0.6
    ones = coco_ap_resamples(evaluator, np.ones((1, 40)))
    for name, stat in (("AP", 0), ("AP50", 1), ("AP75", 2)):
        assert ones[name][0] == pytest.approx(evaluator.stats[stat], abs=1e-12), name

    counts = np.random.default_rng(1).integers(0, 4, 40)
    images, anns, copies = [], [], []
    for i, n in enumerate(counts, start=1):  # image i repeated n times under new ids
        for _ in range(n):
            new = len(images) + 1
            images.append({"id": new, "height": 128, "width": 128})
            own = [a for a in gt["annotations"] if a["image_id"] == i]
            anns += [{**a, "id": len(anns) + k + 1, "image_id": new} for k, a in enumerate(own)]
            copies += [{**d, "image_id": new} for d in dets if d["image_id"] == i]
    repeated = _cocoeval({**gt, "images": images, "annotations": anns}, copies)
    resampled = coco_ap_resamples(evaluator, counts[None].astype(float))
    assert resampled["AP"][0] == pytest.approx(repeated.stats[0], abs=1e-12)
    assert resampled["AP50"][0] == pytest.approx(repeated.stats[1], abs=1e-12)


def test_bootstrap_interval_of_a_perfect_prediction_is_a_point(coco_set):
    evaluator = CocoEvaluator.from_dataset(coco_set)
    evaluator.update(*_perfect(coco_set))
    metrics = evaluator.compute()
    assert metrics["bbox_AP_ci"] == [100.0, 100.0] and metrics["segm_AP_ci"] == [100.0, 100.0]
    assert "bbox_AP_ci" not in CocoEvaluator.from_dataset(coco_set, bootstrap=0).compute()

    seg = SegmentationMetrics(3)
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        label = torch.randint(0, 3, (8, 8), generator=g)
        seg.update(label[None], [{"sem_seg": label, "image_id": i}])
    metrics = seg.compute()
    assert metrics["mIoU"] == 100.0 and metrics["mIoU_ci"] == metrics["mAcc_ci"] == metrics["aAcc_ci"] == [100.0, 100.0]


def _noisy_segmentation(order: list[int], **kwargs) -> SegmentationMetrics:
    """40 images of 4 classes, each pixel wrong with an image-dependent chance, added in ``order``."""
    g = torch.Generator().manual_seed(0)
    images = []
    for i in range(40):
        label = torch.randint(0, 4, (12, 12), generator=g)
        wrong = torch.rand(12, 12, generator=g) < 0.1 + 0.6 * (i % 5) / 5
        images.append((torch.where(wrong, torch.randint(0, 4, (12, 12), generator=g), label), label))
    metrics = SegmentationMetrics(4, **kwargs)
    for i in order:
        pred, label = images[i]
        metrics.update(pred[None], [{"sem_seg": label, "image_id": i}])
    return metrics


def test_bootstrap_intervals_contain_the_estimate_and_are_reproducible():
    forward = list(range(40))
    metrics = _noisy_segmentation(forward).compute()
    for key in ("mIoU", "mAcc", "aAcc"):
        low, high = metrics[f"{key}_ci"]
        assert low < metrics[key] < high and high - low > 1, key
    # the same seed gives the same interval, whatever the order the images came in (as from several processes)
    assert _noisy_segmentation(forward[::-1]).compute() == metrics
    other = _noisy_segmentation(forward, seed=1).compute()
    assert other["mIoU"] == metrics["mIoU"] and other["mIoU_ci"] != metrics["mIoU_ci"]
    narrow = _noisy_segmentation(forward, confidence=0.5).compute()["mIoU_ci"]
    assert metrics["mIoU_ci"][0] < narrow[0] < narrow[1] < metrics["mIoU_ci"][1]

    gt, dets = _synthetic_coco(40, seed=2)
    coco = _cocoeval(gt, dets).cocoGt
    preds, targets = [], []
    for i in range(1, 41):  # the detections as a model's outputs (XYXY boxes; labels are the category ids here)
        mine = [d for d in dets if d["image_id"] == i]
        xywh = torch.tensor([d["bbox"] for d in mine]).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        labels = torch.tensor([d["category_id"] for d in mine], dtype=torch.long)
        preds.append({"boxes": boxes, "labels": labels, "scores": torch.tensor([d["score"] for d in mine])})
        targets.append({"image_id": i})
    results = []
    for seed in (0, 0, 1):
        evaluator = CocoEvaluator(coco, iou_types=("bbox",), seed=seed)
        evaluator.update(preds, targets)
        results.append(evaluator.compute())
    low, high = results[0]["bbox_AP_ci"]
    assert low < results[0]["bbox_AP"] < high and high - low > 1
    assert results[1]["bbox_AP_ci"] == [low, high] and results[2]["bbox_AP_ci"] != [low, high]
    with pytest.raises(ValueError, match="bootstrap"):
        SegmentationMetrics(2, bootstrap=-1)
