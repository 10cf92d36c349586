"""Where a training step's time goes on this CPU: the Fashion-MNIST step (RapidNet-Ti, 32x32) under each memory
format, precision, thread count and batch, interleaved, then a ``torch.profiler`` table of the slowest operators for
one setting.

    python benchmarks/train_step_profile.py                     # rapidnet_ti, 10 classes, batch 128, 32x32
    python benchmarks/train_step_profile.py --settings channels_last-fp32-t2-trim-fused-b256 \
        channels_last-fp32-t2-trim-fused channels_last-fp32-t2-fused-compile-b256 --profile ''   # make demo's choices
    python benchmarks/train_step_profile.py --resolution 224 --batch 32 --profile channels_last-fp32-t2

Each setting is ``FORMAT-PRECISION-tTHREADS[-trim[-nopad]][-fused][-compile][-bBATCH]``: ``contiguous`` or
``channels_last``; ``fp32`` or ``bf16`` (CPU autocast); ``trim``: convs skip padding-only taps
(``rapidnet.engine.conv_taps``, as the trainer does on a CPU); ``nopad``: trimmed depthwise convs pad narrow maps
themselves rather than padding them first (the trim as it was before 2026-12-03); ``fused``: torch's fused AdamW
(``optim.fused``); ``compile``: the model through ``torch.compile`` (``train.compile``; the warm-up, which compiles,
is reported as ``warmup_s``); ``bBATCH``: this setting's batch instead of ``--batch``. Steps of all settings are
interleaved round by round after warm-up and reported as medians, with the time per image relative to the first
setting's. The report also prints the CPU's name and its AMX/AVX-512 flags, because the answer differs between
machines.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import rapidnet
from rapidnet.engine.conv_taps import PaddingTapsTrimmedConv2d, trim_padding_taps_
from rapidnet.utils import cpu_flags, cpu_model

SETTINGS = [
    "channels_last-fp32-t2-trim-fused",  # what the trainer does on a CPU with the Fashion-MNIST configs
    "channels_last-fp32-t2-trim",
    *(f"{fmt}-{prec}-t{t}" for fmt in ("channels_last", "contiguous") for prec in ("fp32", "bf16") for t in (2, 1)),
]


def cpu_description() -> dict[str, object]:
    """The CPU's model name and the ISA flags that decide which kernels oneDNN picks."""
    flags = cpu_flags()
    wanted = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    return {"model": cpu_model() or platform.processor(), "flags": sorted(f for f in wanted if f in flags)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rapidnet_ti")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--settings", nargs="+", default=SETTINGS)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", default="channels_last-fp32-t2-trim-fused", help="setting to profile ('' for none)")
    p.add_argument("--top", type=int, default=15, help="operators in the profile table")
    args = p.parse_args()

    base = rapidnet.create_model(args.model, num_classes=args.num_classes, distillation=False, drop_path_rate=0.05)
    compile_s: dict[str, float] = {}

    runs = {}
    for setting in args.settings:
        fmt_name, prec, threads, *extra = setting.split("-")
        fmt = torch.channels_last if fmt_name == "channels_last" else torch.contiguous_format
        model = copy.deepcopy(base).to(memory_format=fmt).train()
        if "trim" in extra:
            trim_padding_taps_(model)
        if "nopad" in extra:
            for conv in model.modules():
                if isinstance(conv, PaddingTapsTrimmedConv2d):
                    conv.pad_narrow_depthwise = False
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused="fused" in extra)
        batch = next((int(e[1:]) for e in extra if e.startswith("b") and e[1:].isdigit()), args.batch)
        x = torch.randn(batch, 3, args.resolution, args.resolution).contiguous(memory_format=fmt)
        y = torch.randint(0, args.num_classes, (batch,))
        forward = torch.compile(model) if "compile" in extra else model
        runs[setting] = (forward, opt, x, y, prec == "bf16", int(threads[1:]))

    def step(setting: str) -> float:
        forward, opt, x, y, bf16, threads = runs[setting]
        torch.set_num_threads(threads)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {s: [] for s in args.settings}
    for s in args.settings:  # the first steps compile (torch.compile) or pick kernels: timed apart
        start = time.perf_counter()
        for _ in range(args.warmup):
            step(s)
        compile_s[s] = time.perf_counter() - start
    for r in range(args.rounds):
        for s in args.settings if r % 2 == 0 else reversed(args.settings):
            times[s].append(step(s))

    def batch_of(s: str) -> int:
        return len(runs[s][2])

    first = statistics.median(times[args.settings[0]]) / batch_of(args.settings[0])
    report: dict[str, object] = {
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "model": args.model,
        "batch": args.batch,
        "resolution": args.resolution,
        "rounds": args.rounds,
        "settings": {
            s: {
                "batch": batch_of(s),
                "median_step_s": round(statistics.median(ts), 4),
                "images_per_s": round(batch_of(s) / statistics.median(ts), 1),
                "ms_per_image": round(1e3 * statistics.median(ts) / batch_of(s), 3),
                "time_per_image_vs_first": round(statistics.median(ts) / batch_of(s) / first, 3),
                "warmup_s": round(compile_s[s], 1),
            }
            for s, ts in times.items()
        },
    }
    print(json.dumps(report, indent=2))

    if args.profile:
        step(args.profile)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step(args.profile)
        print(f"\nprofile of {args.profile} (3 steps), by self CPU time:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))


if __name__ == "__main__":
    main()
