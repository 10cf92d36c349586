"""Where RapidNet-Ti loses to MobileNetV2 x1.4 in LiteRT fp32: the cost of its GELUs, measured by swapping them.

    python benchmarks/litert_activation_probe.py --rounds 40 --threads 2

Times, in one interleaved run, the LiteRT fp32 files of RapidNet-Ti as shipped (exact GELU), with tanh-approximated
GELU, and with ReLU in place of every GELU (a probe of the same shapes, not a model anyone should ship: its outputs
differ), beside MobileNetV2 x1.4 (ReLU6, which XNNPACK fuses into the convolutions). The ReLU file's ratio to
MobileNetV2 is what the convolutions alone cost; the gap to the shipped file is what the GELUs cost.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

from rapidnet.deploy.bench import BenchResult, build_inference_model, make_runner, time_interleaved
from rapidnet.utils import cpu_flags, cpu_model


def with_activation(model: nn.Module, make: type[nn.Module] | None, **kwargs: object) -> nn.Module:
    """A copy of ``model`` with every ``nn.GELU`` replaced by ``make(**kwargs)``."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.GELU):
                setattr(module, child_name, make(**kwargs))
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resolution", type=int, default=224)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    ti = build_inference_model("rapidnet_ti", (args.resolution,) * 2)
    contestants = {
        "rapidnet_ti (GELU, as shipped)": ti,
        "rapidnet_ti (tanh GELU)": with_activation(ti, nn.GELU, approximate="tanh"),
        "rapidnet_ti (ReLU probe)": with_activation(ti, nn.ReLU),
        "mobilenetv2_140": build_inference_model("mobilenetv2_140", (args.resolution,) * 2),
    }
    x = torch.randn(1, 3, args.resolution, args.resolution)
    runners, results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, model) in enumerate(contestants.items()):
            work = Path(tmp) / str(i)
            work.mkdir()
            runners[name] = make_runner("litert", model, x, args.threads, work)
            for _ in range(3):
                runners[name]()
            results[name] = BenchResult(name, "litert", 1, args.threads, (args.resolution,) * 2, 0, 0.0, "cpu")
        time_interleaved(runners, results, args.rounds)
    medians = {name: statistics.median(r.times_ms) for name, r in results.items()}
    base = medians["mobilenetv2_140"]
    report = {
        "cpu": cpu_model(),
        "avx512": "avx512f" in cpu_flags(),
        "threads": args.threads,
        "rounds": args.rounds,
        "ms": {k: round(v, 3) for k, v in medians.items()},
        "over_mobilenetv2_140": {k: round(v / base, 3) for k, v in medians.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
