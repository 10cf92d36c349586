"""Training-step speed of the mosaic dense models on CPU: fp32 against bfloat16 autocast, and AdamW's step variants.

    python benchmarks/dense_step_speed.py [--backbone rapidnet_ti] [--rounds 6] [--threads 2]
                                          [--fpn-widths 256 128] [--roi-pools] [--det-channels-last]
                                          [--det-fpn-widths 256 128] [--det-mask-widths 128 64] [--det-profile]
                                          [--precision auto|bf16|fp32] [--only-asked]

Semantic FPN (batch 8, channels_last) and Mask R-CNN (batch 4, the mosaic config's RPN/RoI settings) train on
128x128 inputs; fp32 and bf16 steps are interleaved round by round and the medians printed, with their ratio.
Then one AdamW step over Mask R-CNN's trained parameters: torch's default (for-loop), ``foreach`` and ``fused``.
With ``--fpn-widths``, Semantic FPN's steps are also timed at each FPN width (interleaved); with ``--roi-pools``,
Mask R-CNN's steps with torchvision's RoIAlign against ours (``rapidnet.models.roi_align``); with
``--det-channels-last``, Mask R-CNN's steps with NCHW against channels_last weights (``train.channels_last``);
with ``--det-fpn-widths``, Mask R-CNN with a 128-channel mask head (channels_last) at each FPN width;
with ``--det-mask-widths``, the same with a 128-channel FPN at each mask-head width;
with ``--det-profile``, only where the mosaic config's Mask R-CNN step's time goes (128-channel FPN, 64-channel mask
head): ``torch.profiler`` over three steps, each part's share of the forward pass, the slowest operators with their
input shapes, the FLOPs and the fraction of a matmul's rate at the same precision. ``--only-asked`` skips the
comparisons that always run (fp32 against bf16 costs minutes on a CPU that emulates bf16).
The optional comparisons and the profile run in bf16 autocast where oneDNN has bf16 kernels and in fp32 where it has
not, as ``train.amp`` trains (``--precision bf16|fp32`` forces one). One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import MultiScaleRoIAlign

from rapidnet.deploy.bench import best_seconds
from rapidnet.models.detection import mask_rcnn
from rapidnet.models.segmentation import semantic_fpn
from rapidnet.utils import cpu_has_bfloat16


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def detection_batch(size: int = 128, count: int = 4) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Scenes with 4 boxes each (and their filled masks): the mosaic's load without reading it from disk."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(count):
        xy = torch.randint(0, size // 2, (4, 2), generator=g).float()
        wh = torch.randint(24, size // 2, (4, 2), generator=g).float()
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(4, size, size, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist(), strict=True):
            m[y0:y1, x0:x1] = 1
        images.append(torch.rand(3, size, size, generator=g))
        targets.append({"boxes": boxes, "labels": torch.randint(1, 11, (4,), generator=g), "masks": masks})
    return images, targets


#: Mask R-CNN's parts, as module name prefixes (torchvision's names; the first match counts)
DET_PARTS = {
    "backbone": "backbone.body",
    "fpn": "backbone.fpn",
    "rpn": "rpn",
    "box RoIAlign": "roi_heads.box_roi_pool",
    "box head + predictor": "roi_heads.box_",
    "mask RoIAlign": "roi_heads.mask_roi_pool",
    "mask head + predictor": "roi_heads.mask_",
}


def profile_detection_step(
    step: Callable[[bool], None], model: torch.nn.Module, batch: tuple[list, list], amp: bool, steps: int = 3
) -> None:
    """Each part's share of a Mask R-CNN step's forward pass, the ten costliest operators with their input shapes
    (these include the backward ones, whose shapes say which layer they are), then each part's forward FLOPs and the
    step's achieved rate (forward and backward FLOPs over its time) against a matmul's at the same precision.

    Parts are ``record_function`` scopes opened and closed by forward hooks on the detector's outermost modules of
    each part; autograd's backward ops run outside them, so they fall in "the rest"."""
    from torch.profiler import ProfilerActivity, profile

    scopes: dict[int, torch.autograd.profiler.record_function] = {}
    for name, module in model.named_modules():
        part = _part_of(name)
        if part is None:
            continue
        module.register_forward_pre_hook(lambda m, a, part=part: scopes.update({id(m): _enter(part)}))
        module.register_forward_hook(lambda m, a, o: _exit(scopes.pop(id(m))))
    step(amp)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step(amp)
        seconds = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    parts = {f"{e.key} forward %": round(100 * e.cpu_time_total / total, 1) for e in events if e.key in DET_PARTS}
    rest = round(100 - sum(parts.values()), 1)
    precision = "bf16" if amp else "fp32"
    print(json.dumps({"model": f"mask_rcnn_b4_{precision}_profile", "step_s": round(seconds, 3), **parts,
                      "the rest % (backward, optimizer, losses, resize)": rest}))  # fmt: skip
    for e in sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:10]:
        print(json.dumps({"op": e.key, "shapes": str(e.input_shapes)[:120],
                          "self_pct": round(100 * e.self_cpu_time_total / total, 1)}))  # fmt: skip
    with FlopCounterMode(display=False) as counter:  # the whole step's FLOPs, forward and backward
        step(amp)
    step_flops = counter.get_total_flops()
    # by part, forward only: the counter's module attribution of backward FLOPs is not exact
    with FlopCounterMode(display=False) as counter, torch.no_grad(), torch.autocast("cpu", torch.bfloat16, amp):
        model(*batch)
    flops = dict.fromkeys(DET_PARTS, 0)
    for name, ops in counter.get_flop_counts().items():  # names start with the model's class name
        part = _part_of(name.split(".", 1)[-1])
        if part is not None:
            flops[part] += sum(ops.values())
    peak = matmul_peak(torch.bfloat16 if amp else torch.float32)
    print(json.dumps({"model": f"mask_rcnn_b4_{precision}_flops", "step_GFLOP": round(step_flops / 1e9, 1),
                      "forward_GFLOP": round(counter.get_total_flops() / 1e9, 1),
                      **{f"{k} forward GFLOP": round(v / 1e9, 1) for k, v in flops.items()},
                      "achieved_GFLOP_per_s": round(step_flops / seconds / 1e9, 1),
                      f"{precision}_matmul_peak_GFLOP_per_s": round(peak, 1),
                      "fraction_of_peak": round(step_flops / seconds / 1e9 / peak, 3)}))  # fmt: skip


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """The best GFLOP/s of a square PyTorch matmul in ``dtype``: the ceiling of a step's convs and FCs at that
    precision (the bench's ``measure_matmul_peak`` races fp32 across runtimes; a training step runs in PyTorch)."""
    a = torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / best_seconds(lambda: a @ a, repeats) / 1e9


def _part_of(name: str) -> str | None:
    """The part of ``DET_PARTS`` whose outermost modules include ``name`` (first match), else None."""
    part = next((k for k, prefix in DET_PARTS.items() if name.startswith(prefix)), None)
    return part if part is not None and name.count(".") == DET_PARTS[part].count(".") else None


def _enter(part: str) -> torch.autograd.profiler.record_function:
    scope = torch.autograd.profiler.record_function(part)
    scope.__enter__()
    return scope


def _exit(scope: torch.autograd.profiler.record_function) -> None:
    scope.__exit__(None, None, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="rapidnet_ti")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fpn-widths", type=int, nargs="*", default=[], help="also time Semantic FPN at these widths")
    p.add_argument("--roi-pools", action="store_true", help="also time Mask R-CNN with torchvision's RoIAlign")
    p.add_argument("--det-channels-last", action="store_true", help="also time Mask R-CNN with channels_last weights")
    p.add_argument("--det-fpn-widths", type=int, nargs="*", default=[], help="also time Mask R-CNN at these FPN widths")
    p.add_argument("--det-mask-widths", type=int, nargs="*", default=[],
                   help="also time Mask R-CNN at these mask-head widths (128-channel FPN)")  # fmt: skip
    p.add_argument("--det-profile", action="store_true", help="only profile Mask R-CNN's step by part and op")
    p.add_argument("--only-asked", action="store_true", help="skip the precision and AdamW comparisons that always run")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="of the comparisons and the profile; auto: bf16 where oneDNN has its kernels (as train.amp)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    amp = cpu_has_bfloat16() if args.precision == "auto" else args.precision == "bf16"
    precision = "bf16" if amp else "fp32"
    torch.manual_seed(0)

    x = torch.randn(8, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 11, (8, 128, 128))

    def seg_stepper(fpn_channels: int = 256) -> Callable[[bool], None]:
        seg = semantic_fpn(backbone=args.backbone, num_classes=11, fpn_channels=fpn_channels)
        seg = seg.train().to(memory_format=torch.channels_last)
        seg_opt = torch.optim.AdamW(seg.parameters(), 1e-4, fused=True)

        def seg_step(amp: bool) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                logits = F.interpolate(seg(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
                loss = F.cross_entropy(logits.float(), y)
            seg_opt.zero_grad()
            loss.backward()
            seg_opt.step()

        return seg_step

    def race(model: str, steppers: dict[str, Callable[[bool], None]], speedup: tuple[str, str] | None = None) -> None:
        """One JSON line: each variant's median step, interleaved, and ``speedup`` = slow / fast if named."""
        t = interleaved({k: lambda s=s: s(amp) for k, s in steppers.items()}, args.rounds)
        line = {"model": model.format(precision=precision), "backbone": args.backbone, "threads": args.threads,
                **{f"{k}_s": round(v, 3) for k, v in t.items()}}  # fmt: skip
        if speedup:
            line["speedup"] = round(t[speedup[0]] / t[speedup[1]], 2)
        print(json.dumps(line))

    if args.fpn_widths:
        race("semantic_fpn_b8_{precision}", {f"fpn{w}": seg_stepper(w) for w in args.fpn_widths})

    images, targets = detection_batch()

    def det_stepper(
        channels_last: bool = False, **model_kwargs: object
    ) -> tuple[Callable[[bool], None], list[torch.Tensor], torch.nn.Module]:
        torch.manual_seed(0)
        det = mask_rcnn(backbone=args.backbone, num_classes=10, min_size=128, max_size=128,
                        anchor_sizes=[16, 32, 64, 128, 256], rpn_pre_nms_top_n_train=1000,
                        rpn_post_nms_top_n_train=200, box_batch_size_per_image=32, **model_kwargs).train()  # fmt: skip
        if channels_last:
            det = det.to(memory_format=torch.channels_last)
        trained = [q for q in det.parameters() if q.requires_grad]
        det_opt = torch.optim.AdamW(trained, 1e-4, fused=True)

        def det_step(amp: bool) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = sum(det(images, targets).values())
            det_opt.zero_grad()
            loss.backward()
            det_opt.step()

        return det_step, trained, det

    if args.roi_pools:
        names = ["0", "1", "2", "3"]
        torchvision_pools = {"box_roi_pool": MultiScaleRoIAlign(names, 7, 2),
                             "mask_roi_pool": MultiScaleRoIAlign(names, 14, 2)}  # fmt: skip
        steppers = {"torchvision": det_stepper(**torchvision_pools)[0], "rapidnet": det_stepper()[0]}
        race("mask_rcnn_b4_{precision}_roi_align", steppers, speedup=("torchvision", "rapidnet"))
    if args.det_channels_last:
        steppers = {"nchw": det_stepper()[0], "channels_last": det_stepper(channels_last=True)[0]}
        race("mask_rcnn_b4_{precision}_layout", steppers, speedup=("nchw", "channels_last"))
    # one width varied, the other held at 128, channels_last weights
    for varied, held, widths in (("fpn", "mask", args.det_fpn_widths), ("mask", "fpn", args.det_mask_widths)):
        names = {"fpn": "fpn_channels", "mask": "mask_head_channels"}
        steppers = {f"{varied}{w}": det_stepper(channels_last=True, **{names[varied]: w, names[held]: 128})[0]
                    for w in widths}  # fmt: skip
        if steppers:
            race(f"mask_rcnn_b4_{{precision}}_{held}128", steppers)
    if args.det_profile:  # the mosaic config's widths, channels_last weights
        det_step, _, det = det_stepper(channels_last=True, fpn_channels=128, mask_head_channels=64)
        profile_detection_step(det_step, det, (images, targets), amp)
        return
    if args.only_asked:
        return
    det_step, trained, det = det_stepper()

    seg_step = seg_stepper()
    for name, step in (("semantic_fpn_b8", seg_step), ("mask_rcnn_b4", det_step)):
        t = interleaved({"fp32": lambda s=step: s(False), "bf16": lambda s=step: s(True)}, args.rounds)
        print(json.dumps({"model": name, "backbone": args.backbone, "threads": args.threads,
                          "fp32_s": round(t["fp32"], 3), "bf16_s": round(t["bf16"], 3),
                          "speedup": round(t["fp32"] / t["bf16"], 2)}))  # fmt: skip

    for q in trained:
        q.grad = torch.randn_like(q)
    variants = {k: torch.optim.AdamW(trained, 1e-4, **kw) for k, kw in
                {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}.items()}  # fmt: skip
    t = interleaved({k: opt.step for k, opt in variants.items()}, args.rounds)
    print(json.dumps({"model": "adamw_step", "params_M": round(sum(q.numel() for q in trained) / 1e6, 1),
                      **{f"{k}_ms": round(v * 1000, 1) for k, v in t.items()}}))  # fmt: skip


if __name__ == "__main__":
    main()
