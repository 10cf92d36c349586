"""Training-form vs fused RapidNet in eager PyTorch on CPU, timed interleaved in one run.

    python benchmarks/reparam_speedup.py --model rapidnet_ti --batch 1 --resolution 224 --threads 2 --rounds 30

Each round times one forward of each model (order rotating), after warm-up; the report gives medians, the
interquartile range and the ratio of medians, so machine noise hits all models alike. Two contestants:

- ``unfused``: the training-form model in eval mode;
- ``fused``: ``rapidnet.reparameterize(model)``, the plain folded graph (what every exporter takes).

``speedup_fused_vs_unfused`` is the headline ratio (unfused / fused). What Inductor adds on top of folding is
``benchmarks/inductor_speedup.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import rapidnet


def time_once(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        model(x)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rapidnet_ti")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5, help="forwards per timing")
    p.add_argument("--channels-last", action="store_true", help="channels_last input (and weights) for both")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    unfused = rapidnet.create_model(args.model).eval()
    models = {"unfused": unfused, "fused": rapidnet.reparameterize(unfused)}
    x = torch.randn(args.batch, 3, args.resolution, args.resolution)
    if args.channels_last:
        models = {name: m.to(memory_format=torch.channels_last) for name, m in models.items()}
        x = x.contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        reference = unfused(x)
        assert torch.allclose(models["fused"](x), reference, atol=1e-4, rtol=1e-4)
        for m in models.values():
            for _ in range(3):
                m(x)
        for r in range(args.rounds):
            order = list(models)[r % len(models) :] + list(models)[: r % len(models)]  # rotate the order
            for name in order:
                times[name].append(time_once(models[name], x, args.repeats))
    report = {
        "model": args.model,
        "batch": args.batch,
        "resolution": args.resolution,
        "threads": args.threads,
        "channels_last": args.channels_last,
        "torch": torch.__version__,
    }
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        report[name] = {"median_ms": round(statistics.median(ts), 3), "iqr_ms": [round(q[0], 3), round(q[2], 3)]}
    report["speedup_fused_vs_unfused"] = round(report["unfused"]["median_ms"] / report["fused"]["median_ms"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
