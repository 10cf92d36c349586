"""The MLDC ablation study: every variant trained under one recipe and budget, then one table and one figure.

    python benchmarks/mldc_ablation.py --out runs/mldc_ablation            # data, 10 trainings, report (~45 min)
    python benchmarks/mldc_ablation.py --out runs/mldc_ablation --report-only   # re-measure and re-plot only

Task: Semantic FPN on mosaic scenes of Fashion-MNIST garments at 160x160, from scratch, the same seed, data and
epochs for every variant (``configs/mldc_ablation_semantic_fpn.yaml`` says why). Each training is an ordinary
``rapidnet seg train`` run in ``OUT/runs/<variant>``; an interrupted study resumes where it stopped (finished runs
are kept, a half-finished one resumes from its ``last.pt``).

The report, measured in one process after the trainings:

- params and GMACs of the backbone as a 1000-class classifier at 224x224 (the figure mobile papers quote);
- fused batch-1 latency of that classifier at 224x224, eager PyTorch (the eager-CPU pass, channels_last) and
  onnxruntime, interleaved round by round, median of ``--rounds``;
- validation mIoU of the final weights (the run evaluates once, after its last epoch);
- the effective receptive field of the trained backbone at stages 2 and 3 (t = 50% and 90%, as fractions of the
  input side) on validation scenes at the task's resolution, and RapidNet-Ti at initialisation beside them.

Writes ``OUT/ablation.json``, ``OUT/ablation.md``, ``OUT/ablation.png`` (mIoU against onnxruntime latency and
against the ERF) and ``OUT/erf.png`` (heat maps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import rapidnet
from rapidnet.deploy import bench
from rapidnet.engine import read_jsonl
from rapidnet.models import create_model, is_rapidnet
from rapidnet.models.complexity import count_gmacs, count_params
from rapidnet.utils import atomic_write, cpu_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mldc_ablation_semantic_fpn.yaml"

#: variant -> (backbone, RapidNet keyword arguments); the paper's design first
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "paper (2, 3)": ("rapidnet_ti", {}),
    "single branch (2,)": ("rapidnet_ti", {"mldc_dilations": [2]}),
    "no dilation (1, 1)": ("rapidnet_ti", {"mldc_dilations": [1, 1]}),
    "(2, 2)": ("rapidnet_ti", {"mldc_dilations": [2, 2]}),
    "(3, 3)": ("rapidnet_ti", {"mldc_dilations": [3, 3]}),
    "three levels (1, 2, 3)": ("rapidnet_ti", {"mldc_dilations": [1, 2, 3]}),
    "three levels (2, 3, 4)": ("rapidnet_ti", {"mldc_dilations": [2, 3, 4]}),
    "depthwise (2, 3)": ("rapidnet_ti", {"mldc_groups": "depthwise"}),
    "FFN kernel 3": ("rapidnet_ti", {"ffn_kernel": 3}),
    "MobileNetV2 x1.4": ("mobilenetv2_140", {}),
}
#: the paper's design again with other seeds: how far one seed's mIoU moves (the noise every comparison sits in)
REPEATS = {"paper (2, 3), seed +1": ("paper (2, 3)", 1)}


def slug(variant: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in variant.lower()).strip("-").replace("--", "-")


def build_data(out: Path, args: argparse.Namespace) -> Path:
    data = out / "data"
    if not (data / "meta.json").exists():
        cmd = [sys.executable, "-m", "rapidnet", "data", "mosaic", "--out", str(data), "--seed", str(args.seed)]
        cmd += [
            "--num-train",
            str(args.num_train),
            "--num-val",
            str(args.num_val),
            "--image-size",
            str(args.resolution),
        ]
        subprocess.run(cmd, check=True)
    return data


def finished_epochs(run: Path) -> int:
    log = run / "log.jsonl"
    return max((int(r.get("epoch", 0)) for r in read_jsonl(log)), default=0) if log.exists() else 0


def train_variant(variant: str, data: Path, out: Path, args: argparse.Namespace) -> Path:
    """One ``rapidnet seg train`` run; skipped when finished, resumed when interrupted."""
    run = out / "runs" / slug(variant)
    if finished_epochs(run) >= args.epochs:
        return run
    base, seed_offset = REPEATS.get(variant, (variant, 0))
    name, kwargs = VARIANTS[base]
    cmd = [sys.executable, "-m", "rapidnet", "seg", "train", "--config", str(CONFIG), "--data", str(data)]
    cmd += ["--epochs", str(args.epochs), "--output", str(run), "--set", f"model.name={name}"]
    cmd += ["--set", f"model.kwargs={json.dumps(kwargs)}", "--set", f"train.seed={args.seed + seed_offset}"]
    if (run / "last.pt").exists():
        cmd += ["--resume", str(run / "last.pt")]
    subprocess.run(cmd, check=True)
    return run


def final_miou(run: Path, data: Path) -> tuple[float, list[float]]:
    """Validation mIoU of the run's final weights (``last.pt``) and its bootstrap 95% interval (``seg eval``)."""
    cmd = [sys.executable, "-m", "rapidnet", "seg", "eval", "--checkpoint", str(run / "last.pt"), "--data", str(data)]
    out = subprocess.run([*cmd, "--raw-weights", "--json"], check=True, capture_output=True, text=True).stdout
    metrics = json.loads(out)
    return float(metrics["mIoU"]), [float(v) for v in metrics["mIoU_ci"]]


def classifier(variant: str) -> torch.nn.Module:
    name, kwargs = VARIANTS[variant]
    if is_rapidnet(name):
        return create_model(name, distillation=False, **kwargs).eval()
    import timm

    return timm.create_model(name).eval()


def measure_latency(variants: list[str], threads: int, rounds: int) -> dict[str, dict[str, float]]:
    """Fused 224x224 batch-1 latency (ms) per variant, eager (channels_last) and onnxruntime."""
    torch.set_num_threads(threads)
    x = torch.randn(1, 3, 224, 224)
    runners: dict[tuple[str, str], Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in tqdm(variants, desc="preparing latency runs", file=sys.stderr):
            fused = rapidnet.reparameterize(classifier(variant))
            runners[variant, "eager"] = bench.make_runner("torch-cl", fused, x, threads, Path(tmp))
            workdir = Path(tmp) / slug(variant)
            workdir.mkdir()
            runners[variant, "onnxruntime"] = bench.make_runner("onnx", fused, x, threads, workdir)
        for run in runners.values():  # warm-up
            for _ in range(3):
                run()
        times: dict[tuple[str, str], list[float]] = {k: [] for k in runners}
        keys = list(runners)
        for r in tqdm(range(rounds), desc="latency rounds", file=sys.stderr):
            for key in keys if r % 2 == 0 else reversed(keys):
                start = time.perf_counter()
                runners[key]()
                times[key].append(time.perf_counter() - start)
    out: dict[str, dict[str, float]] = {v: {} for v in variants}
    for (variant, backend), ts in times.items():
        out[variant][backend] = round(statistics.median(ts) * 1000, 3)
    return out


def trained_backbone(run: Path) -> torch.nn.Module:
    model, _ = rapidnet.load(run / "last.pt", use_ema=False)
    return model


def measure_erfs(
    variants: list[str], runs: dict[str, Path], data: Path, args: argparse.Namespace
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """ERF of stages 2 and 3 of each trained backbone, and of RapidNet-Ti at initialisation."""
    from rapidnet.analysis import erf

    images = erf.load_images(data / "images" / "validation", args.erf_images, args.resolution, seed=args.seed)
    models = {v: trained_backbone(runs[v]) for v in variants}
    models["RapidNet-Ti at init"] = create_model("rapidnet_ti").eval()
    rows: dict[str, dict[str, Any]] = {}
    results: list[dict[str, Any]] = []
    for label, model in tqdm(models.items(), desc="effective receptive fields", file=sys.stderr):
        stages = erf.measure_erf(model, images, stages=(2, 3), name=label, batch_size=4, seed=args.seed)
        results += [dict(s, model=label) for s in stages]
        keys = ("t20", "t50", "t90", "t99", "theoretical_rf", "theoretical_rf_clipped")
        rows[label] = {f"stage{s['stage']}": {k: s[k] for k in keys} for s in stages}
    return rows, results


def write_report(out: Path, report: dict[str, Any]) -> None:
    atomic_write(out / "ablation.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    lines = [
        f"Semantic FPN on {report['data']['num_train']} mosaic scenes at {report['data']['resolution']} px, from "
        f"scratch, {report['epochs']} epochs, seed {report['seed']}; final weights on {report['data']['num_val']} "
        f"validation scenes. Latency: fused classifier, 224x224, batch 1, {report['machine']['threads']} threads, "
        f"{report['machine']['cpu']}.",
        "",
        "| variant | params (M) | GMACs | eager (ms) | onnxruntime (ms) | mIoU [95% CI] | ERF t50 s2 / s3 "
        "| ERF t90 s2 / s3 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, row in report["variants"].items():
        e = row.get("erf", {})
        t50 = " / ".join(f"{e[s]['t50']:.2f}" for s in ("stage2", "stage3") if s in e)
        t90 = " / ".join(f"{e[s]['t90']:.2f}" for s in ("stage2", "stage3") if s in e)
        lines.append(
            f"| {variant} | {row['params_m']:.2f} | {row['gmacs']:.3f} | {row['latency_ms']['eager']:.2f} | "
            f"{row['latency_ms']['onnxruntime']:.2f} | {row['miou']:.2f} [{row['miou_ci'][0]:.1f}, "
            f"{row['miou_ci'][1]:.1f}] | {t50} | {t90} |"
        )
    for name, rep in report.get("repeats", {}).items():
        first = report["variants"].get(rep["of"], {}).get("miou")
        if first is not None:
            lines += [
                "",
                f"{name}: mIoU {rep['miou']:.2f} against {first:.2f} at seed {report['seed']} "
                f"(difference {rep['miou'] - first:+.2f}: the noise of one seed).",
            ]
    init = report.get("erf_at_init", {})
    if init:
        lines += [
            "",
            f"RapidNet-Ti at initialisation: ERF t50 {init['stage2']['t50']:.2f} / {init['stage3']['t50']:.2f}, "
            f"t90 {init['stage2']['t90']:.2f} / {init['stage3']['t90']:.2f} (stage 2 / 3).",
        ]
    text = "\n".join(lines) + "\n"
    atomic_write(out / "ablation.md", lambda tmp: Path(tmp).write_text(text))
    print(text)


def plot(out: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for variant, row in report["variants"].items():
        colour = "tab:red" if variant.startswith("paper") else "tab:gray" if "MobileNet" in variant else "tab:blue"
        ms, miou = row["latency_ms"]["onnxruntime"], row["miou"]
        left.scatter(ms, miou, color=colour)
        left.annotate(variant, (ms, miou), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if "stage3" in row.get("erf", {}):
            t50 = row["erf"]["stage3"]["t50"]
            right.scatter(t50, miou, color=colour)
            right.annotate(variant, (t50, miou), fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.set(xlabel="onnxruntime latency, 224x224 batch 1 (ms)", ylabel="mosaic mIoU (final weights)")
    right.set(xlabel="ERF t50 of stage 3 (fraction of the input side)", ylabel="mosaic mIoU (final weights)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"MLDC ablation: Semantic FPN from scratch, {report['epochs']} epochs, seed {report['seed']}")
    fig.tight_layout()
    atomic_write(out / "ablation.png", lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/mldc_ablation"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    p.add_argument("--repeats", nargs="*", default=list(REPEATS), choices=list(REPEATS), help="other seeds")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-train", type=int, default=800)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--resolution", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30, help="latency rounds")
    p.add_argument("--erf-images", type=int, default=32)
    p.add_argument("--report-only", action="store_true", help="no training: measure and plot the finished runs")
    p.add_argument("--train-only", action="store_true", help="train (and resume) the runs, no report")
    args = p.parse_args()

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(out, args)
    runs: dict[str, Path] = {}
    for variant in tqdm([*args.variants, *args.repeats], desc="trainings", file=sys.stderr):
        run = out / "runs" / slug(variant)
        runs[variant] = run if args.report_only else train_variant(variant, data, out, args)
        if finished_epochs(runs[variant]) < args.epochs:
            raise SystemExit(
                f"{variant}: {runs[variant]} has not finished {args.epochs} epochs: run without --report-only"
            )
    if args.train_only:
        return

    latency = measure_latency(args.variants, args.threads, args.rounds)
    erf_rows, erf_results = measure_erfs(args.variants, runs, data, args)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": {"cpu": cpu_model() or "unknown CPU", "threads": args.threads, "torch": torch.__version__},
        "epochs": args.epochs,
        "seed": args.seed,
        "data": {"num_train": args.num_train, "num_val": args.num_val, "resolution": args.resolution},
        "variants": {},
        "erf_at_init": erf_rows.get("RapidNet-Ti at init", {}),
    }
    for variant in args.variants:
        model = classifier(variant)
        report["variants"][variant] = {
            "backbone": VARIANTS[variant][0],
            "kwargs": VARIANTS[variant][1],
            "params_m": count_params(model) / 1e6,
            "gmacs": count_gmacs(rapidnet.reparameterize(model), 224),
            "latency_ms": latency[variant],
            "miou": (scored := final_miou(runs[variant], data))[0],
            "miou_ci": scored[1],
            "erf": erf_rows.get(variant, {}),
            "run": str(runs[variant]),
        }
    report["repeats"] = {
        r: {"of": REPEATS[r][0], "seed": args.seed + REPEATS[r][1], "miou": final_miou(runs[r], data)[0]}
        for r in args.repeats
    }
    write_report(out, report)
    plot(out, report)
    from rapidnet.analysis import erf

    shown = ("paper (2, 3)", "RapidNet-Ti at init", "single branch (2,)", "no dilation (1, 1)", "MobileNetV2 x1.4")
    erf.plot_erf([r for r in erf_results if r["model"] in shown], out / "erf.png")


if __name__ == "__main__":
    main()
