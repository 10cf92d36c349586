"""Training throughput (images/s of a full train step: forward, loss, backward, AdamW step) of several models.

    python benchmarks/train_throughput.py --models rapidnet_ti mobilenetv2_140 --batch 64 --resolution 224 \
        --threads 2 --rounds 5 [--device cuda --amp --channels-last]

Steps of the models are interleaved round by round, after warm-up; the report gives each model's median step time
and images/s, and the ratio to the first model. RapidNet trains with a single head here (no teacher), as
``rapidnet train`` does without distillation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch

import rapidnet


def build(name: str) -> torch.nn.Module:
    if rapidnet.models.is_rapidnet(name):
        return rapidnet.create_model(name, distillation=False)
    return timm.create_model(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["rapidnet_ti", "mobilenetv2_140"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CPU, fp16 on CUDA")
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    setups = {}
    for name in args.models:
        model = build(name).to(device).to(memory_format=fmt).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(enabled=args.amp and device.type == "cuda")
        setups[name] = (model, opt, scaler)

    def step(name: str) -> float:
        model, opt, scaler = setups[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {n: [] for n in args.models}
    for _ in range(args.warmup):
        for n in args.models:
            step(n)
    for r in range(args.rounds):
        for n in args.models if r % 2 == 0 else reversed(args.models):
            times[n].append(step(n))
    first = statistics.median(times[args.models[0]])
    report = {
        "batch": args.batch,
        "resolution": args.resolution,
        "threads": args.threads,
        "device": str(device),
        "amp": args.amp,
        "channels_last": args.channels_last,
        "torch": torch.__version__,
        "models": {},
    }
    for n, ts in times.items():
        med = statistics.median(ts)
        report["models"][n] = {
            "median_step_s": round(med, 3),
            "images_per_s": round(args.batch / med, 1),
            "min_step_s": round(min(ts), 3),
            "step_time_vs_first": round(med / first, 3),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
