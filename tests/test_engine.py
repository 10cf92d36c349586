"""Engine pieces in isolation: reproducible sampling, RNG capture, optimizer groups, run logs; the Trainer on a toy
task: named losses in every log, callbacks and their hooks, TensorBoard event files, exact resume of the per-loss
epoch means."""

from __future__ import annotations

import copy
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

import rapidnet
from rapidnet.config import load_config
from rapidnet.data.tensor_augment import TensorAugment
from rapidnet.engine import (
    Callback,
    JsonlLog,
    SeededDataset,
    SeededSampler,
    StepOutput,
    Task,
    Trainer,
    load_training_state,
    read_jsonl,
)
from rapidnet.engine.checkpoint import capture_rng, restore_rng
from rapidnet.errors import ConfigError
from rapidnet.tasks.classification import ClassificationTask, DistillationLoss, TensorBatches
from rapidnet.utils import subset_indices


def _batches(sampler: SeededSampler) -> list[list[tuple[int, int]]]:
    items = list(sampler)
    return [items[i : i + sampler.batch_size] for i in range(0, len(items), sampler.batch_size)]


def test_two_processes_see_the_global_batches_of_one():
    one = SeededSampler(50, batch_size=8, seed=3)
    ranks = [SeededSampler(50, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(5)
    assert one.num_batches == ranks[0].num_batches == ranks[1].num_batches == 6
    for b, batch in enumerate(_batches(one)):
        split = _batches(ranks[0])[b] + _batches(ranks[1])[b]
        assert sorted(batch) == sorted(split)  # same images, same augmentation seeds


def test_order_depends_on_seed_and_epoch_and_start_batch_skips_exactly():
    s = SeededSampler(40, batch_size=4, seed=0)
    s.set_epoch(0)
    epoch0 = list(s)
    s.set_epoch(1)
    assert [i for i, _ in list(s)] != [i for i, _ in epoch0]
    s.set_epoch(0, start_batch=3)
    assert list(s) == epoch0[12:] and len(s) == len(epoch0) - 12
    other = SeededSampler(40, batch_size=4, seed=1)
    other.set_epoch(0)
    assert list(other) != epoch0


def test_repeated_augmentation_gives_each_copy_another_seed():
    ranks = [SeededSampler(64, batch_size=8, seed=0, rank=r, world_size=2, repeats=3) for r in range(2)]
    items = []
    for s in ranks:
        s.set_epoch(0)
        items += list(s)
    assert ranks[0].num_batches == ranks[1].num_batches > 0
    indices = [i for i, _ in items]
    assert len(set(indices)) < len(indices)  # repeats present ...
    assert len({seed for _, seed in items}) == len(items)  # ... each augmented differently


def test_seeded_dataset_transform_depends_only_on_the_seed():
    class Noise:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return i, random.random(), torch.rand(1).item(), np.random.rand()

    ds = SeededDataset(Noise(), indices=[3, 1])
    assert len(ds) == 2 and ds[(0, 7)] == ds[(0, 7)] and ds[(0, 7)][0] == 3
    assert ds[(0, 7)] != ds[(0, 8)]


def test_subset_is_fixed_and_spread():
    a = subset_indices(1000, 100)
    assert a == subset_indices(1000, 100) and len(set(a)) == 100 and max(a) > 500
    assert subset_indices(10, None) == list(range(10)) and subset_indices(10, 50) == list(range(10))


def test_rng_capture_restores_every_generator():
    state = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_no_weight_decay_on_norms_biases_and_layer_scales():
    cfg = load_config(values={"optim.weight_decay": 0.05})
    model = rapidnet.create_model(
        "rapidnet_ti", num_classes=10, depths=((1, 0), (1, 0), (1, 1), (1, 1)), widths=(16, 24, 32, 48), head_dim=64
    )
    optimizer = ClassificationTask(cfg).build_optimizer(model, lr=1e-3)
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["eps"] == 1e-8
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay and all(p.ndim > 1 for p in model.parameters() if id(p) in decay)
    skipped = [names[id(p)] for p in model.parameters() if id(p) not in decay]
    assert any("gamma" in n for n in skipped) and any(n.endswith("bn.weight") for n in skipped)
    assert any(n.endswith("conv.bias") for n in skipped)


def test_fused_optimizer_takes_the_same_steps_and_refuses_optimizers_without_one():
    """``optim.fused`` gives torch's fused kernel: the same update as the default loop (to float rounding)."""
    model = rapidnet.create_model(
        "rapidnet_ti", num_classes=10, depths=((1, 0), (1, 0), (1, 1), (1, 1)), widths=(16, 24, 32, 48), head_dim=64
    )
    twin = copy.deepcopy(model)
    fused = ClassificationTask(load_config(values={"optim.fused": True})).build_optimizer(model, lr=1e-3)
    plain = ClassificationTask(load_config()).build_optimizer(twin, lr=1e-3)
    assert fused.defaults["fused"] is True and not plain.defaults.get("fused")
    x = torch.randn(2, 3, 32, 32)
    for net, opt in ((model, fused), (twin, plain)):
        for _ in range(3):
            opt.zero_grad()
            net.eval()(x).logsumexp(1).mean().backward()  # eval: one head, no drop-path draws
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match=r"optim\.fused"):
        ClassificationTask(load_config(values={"optim.fused": True, "optim.opt": "lamb"})).build_optimizer(model, 1e-3)


def test_tensor_batches_augment_reproducibly():
    images = torch.arange(6 * 8 * 8, dtype=torch.uint8).view(6, 8, 8)
    sampler = SeededSampler(6, batch_size=2, seed=0)
    tb = TensorBatches(images, torch.arange(6), sampler, TensorAugment((0.5,) * 3, (0.25,) * 3, hflip=0.5, padding=2))
    first = list(tb.batches(0, 0))
    again = list(tb.batches(0, 1))
    assert len(first) == 3 and first[0][0].shape == (2, 3, 8, 8)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first[1:], again, strict=True))
    x = first[0][0]
    assert torch.equal(x[:, 0], x[:, 1])  # grayscale replicated to RGB
    assert x.min() >= (0 - 0.5) / 0.25 and x.max() <= (1 - 0.5) / 0.25


def test_tensor_batches_zoom_draws_one_size_per_batch_and_places_each_image_at_random():
    images = torch.full((16, 32, 32), 255, dtype=torch.uint8)  # white tiles: the placed patch is its own mask
    sampler = SeededSampler(16, batch_size=8, seed=0)
    tb = TensorBatches(
        images, torch.arange(16), sampler, TensorAugment((0.0,) * 3, (1.0,) * 3, hflip=0.5, zoom=(20, 60))
    )
    sizes, places = set(), set()
    for epoch in range(4):
        for x, _, _ in tb.batches(epoch, 0):
            assert x.shape[-1] == x.shape[-2] and x.min() >= 0 and x.max() <= 1
            on = x[:, 0] > 0.99
            rows, cols = on.any(2), on.any(1)
            heights, widths = rows.sum(1), cols.sum(1)
            assert len(set(heights.tolist())) == 1 and len(set(widths.tolist())) == 1  # one size per batch
            side = max(heights[0], widths[0]).item()
            assert 20 * (3 / 4) ** 0.5 - 1 <= side <= 60 * (4 / 3) ** 0.5 + 1
            assert side <= x.shape[-1] <= round(side * 1.25) + 1  # a canvas up to a quarter larger
            assert on.sum((1, 2)).tolist() == (heights * widths).tolist()  # a filled rectangle each
            sizes.add(x.shape[-1])
            places.update(zip(rows.float().argmax(1).tolist(), cols.float().argmax(1).tolist(), strict=True))
    assert len(sizes) > 2 and len(places) > 8
    again = next(iter(tb.batches(3, 0)))[0]
    assert torch.equal(again, next(iter(tb.batches(3, 0)))[0])  # reproducible per (seed, epoch, batch)
    noisy = TensorBatches(images // 2, torch.arange(16), sampler, TensorAugment((0.0,) * 3, (1.0,) * 3, noise=8.0))
    x = next(iter(noisy.batches(0, 0)))[0]
    assert x.std() > 0 and x.min() >= 0 and x.max() <= 1


@pytest.mark.parametrize("zoom", [[1, 8], [40, 20], [32]])
def test_zoom_config_is_checked(zoom):
    with pytest.raises(ConfigError, match=r"aug\.zoom"):
        load_config(values={"aug.zoom": zoom})


def test_jsonl_log_survives_a_torn_line_and_truncates(tmp_path):
    log = JsonlLog(tmp_path / "log.jsonl")
    for epoch in (1, 2, 3):
        log.append({"epoch": epoch, "loss": float("nan") if epoch == 2 else 1.0})
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"epoch": 4, "lo')
    records = read_jsonl(tmp_path / "log.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[1]["loss"] is None
    log.keep_only(lambda r: r["epoch"] <= 2)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "log.jsonl")] == [1, 2]
    with pytest.raises(rapidnet.DataError):
        read_jsonl(tmp_path / "missing.jsonl")


# ---- the Trainer on a toy task: named losses, callbacks, TensorBoard, exact resume -----------------------------------


class _ToyTask(Task):
    """Linear regression on data drawn from ``(epoch, step)``: a step returns two named losses beside the total."""

    primary_metric = "mse"
    higher_is_better = False
    metric_names = {"mse": "val mse"}

    def __init__(self, cfg, steps: int = 4) -> None:
        super().__init__(cfg)
        self.steps = steps
        self.loaders_built = False

    def build_model(self) -> torch.nn.Module:
        assert not self.loaders_built  # the engine builds the loaders after the model, not the task inside it
        return torch.nn.Linear(4, 1)

    def build_loaders(self) -> None:
        self.loaders_built = True

    @property
    def batch_size(self) -> int:
        return 8

    def steps_per_epoch(self) -> int:
        return self.steps

    def train_batches(self, epoch, start_step):
        assert self.loaders_built
        for step in range(start_step, self.steps):
            g = torch.Generator().manual_seed(1000 * epoch + step)
            x = torch.randn(8, 4, generator=g)
            yield x, x.sum(1, keepdim=True)

    def train_step(self, model, batch):
        x, y = batch
        pred = model(x)
        mse = torch.nn.functional.mse_loss(pred, y)
        l1 = (pred - y).abs().mean() * 0.1
        return StepOutput(mse + l1, len(x), {"mse": mse.detach(), "loss_l1": l1.detach()})

    def evaluate(self, model):
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            return {"mse": float(torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)))}


class _Recorder(Callback):
    """Records every hook call; keeps a counter in the checkpoint; optionally SIGTERMs itself after one step."""

    def __init__(self, stop_at: tuple[int, int] | None = None) -> None:
        self.calls: list[str] = []
        self.records: list[dict] = []
        self.results: list[list[str]] = []
        self.updates = 0
        self.loaded: dict | None = None
        self.stop_at = stop_at

    def __getattribute__(self, name):
        if name.startswith("on_") or name in ("setup", "teardown"):
            self.calls.append(name)
        return object.__getattribute__(self, name)

    def on_optimizer_step(self, trainer):
        self.updates += 1

    def on_train_step_end(self, trainer, record):
        self.records.append(record)
        if self.stop_at == (trainer.epoch, trainer.step):
            os.kill(os.getpid(), signal.SIGTERM)

    def on_evaluate(self, trainer, results):
        self.results.append(list(results))

    def on_save_checkpoint(self, trainer, state):
        state["recorder"] = {"updates": self.updates}

    def on_load_checkpoint(self, trainer, state):
        self.loaded = dict(state["recorder"])
        self.updates = self.loaded["updates"]


def _toy_config(out, **values):
    return load_config(
        values={
            "train.output": str(out),
            "train.epochs": 2,
            "train.device": "cpu",
            "train.log_interval": 1,
            "optim.lr": 0.02,
            "sched.warmup_epochs": 0,
            "ema.decay": 0.5,
            **values,
        }
    )


def test_callbacks_receive_the_hooks_in_order_and_named_losses_are_logged(tmp_path, capsys):
    out = tmp_path / "toy"
    recorder = _Recorder()
    result = Trainer(_ToyTask(_toy_config(out), steps=2), _toy_config(out), progress=False, callbacks=[recorder]).fit()
    assert result.status == "completed"
    step = ["on_optimizer_step", "on_train_step_end"]
    # last.pt is saved before the evaluation (which may fail) and again after it (with the new best)
    epoch = ["on_train_epoch_start", *step, *step, "on_train_epoch_end", "on_save_checkpoint", "on_evaluate",
             "on_save_checkpoint", "on_epoch_end"]  # fmt: skip
    assert recorder.calls == ["setup", "on_fit_start", *epoch, *epoch, "on_fit_end", "teardown"]
    assert recorder.results == [["model", "ema"]] * 2  # user callbacks run after the defaults (the EMA's evaluation)
    assert recorder.updates == 4 and all(r is not None for r in recorder.records)  # log_interval 1: every step

    steps = read_jsonl(out / "steps.jsonl")
    assert [r for r in recorder.records] == steps
    for r in steps:  # each named loss beside the total; a name without loss_ gets it
        assert r["loss"] == pytest.approx(r["loss_mse"] + r["loss_l1"], rel=1e-6)
    log = read_jsonl(out / "log.jsonl")
    for epoch_record, pair in zip(log, (steps[:2], steps[2:]), strict=True):
        for key in ("loss", "loss_mse", "loss_l1"):  # equal batches: the epoch mean is the mean of the steps
            assert epoch_record[f"train_{key}"] == pytest.approx(sum(r[key] for r in pair) / 2, rel=1e-12)
        assert {"val_mse", "ema_val_mse"} <= set(epoch_record)
    text = capsys.readouterr().out
    assert "(mse " in text and ", l1 " in text and "val val mse " in text  # the epoch line, with the task's names
    assert load_training_state(out / "last.pt")["recorder"] == {"updates": 4}
    assert (out / "model_best.safetensors").is_file() and (out / "best.pt").is_file()


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_interrupted_epoch_resumes_with_the_same_per_loss_means_and_tensorboard_events(tmp_path, capsys):
    """SIGTERM after step 2 of epoch 2, then --resume: the steps, the epoch means of every named loss (their running
    sums are in last.pt), the callbacks' own state and TensorBoard's event series equal an uninterrupted run's."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert Trainer(_ToyTask(_toy_config(ref)), _toy_config(ref), progress=False).fit().status == "completed"
    recorder = _Recorder(stop_at=(1, 2))
    result = Trainer(_ToyTask(_toy_config(cut)), _toy_config(cut), progress=False, callbacks=[recorder]).fit()
    assert result.status == "interrupted"
    state = load_training_state(cut / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 3) and set(state["meter"]["losses"]) == {"mse", "loss_l1"}
    assert state["recorder"] == {"updates": 7} and state["best"]["epoch"] == 1

    again = _Recorder()
    cfg = _toy_config(cut)
    # TensorBoard reads event files in name order, "<seconds>.<host>.<pid>.<writer count>": in one process within one
    # second the count decides, and writer 10 sorts before writer 9. A resume is a new process a user starts later;
    # a second's wait gives this in-process one the same later time stamp.
    time.sleep(1.05)
    assert Trainer(_ToyTask(cfg), cfg, resume=cut / "last.pt", progress=False, callbacks=[again]).fit().exit_code == 0
    assert again.calls[:3] == ["setup", "on_load_checkpoint", "on_fit_start"] and again.loaded == {"updates": 7}
    assert read_jsonl(cut / "steps.jsonl") == [
        {**r, "img_per_s": c["img_per_s"]}
        for r, c in zip(read_jsonl(ref / "steps.jsonl"), read_jsonl(cut / "steps.jsonl"), strict=True)
    ]
    keys = ("train_loss", "train_loss_mse", "train_loss_l1", "val_mse", "ema_val_mse", "best_mse", "best_epoch")
    for a, b in zip(read_jsonl(cut / "log.jsonl"), read_jsonl(ref / "log.jsonl"), strict=True):
        assert [a[k] for k in keys] == [b[k] for k in keys]

    events, expected = _scalars(cut / "tensorboard"), _scalars(ref / "tensorboard")
    assert {"train/loss", "train/loss_mse", "train/loss_l1", "train/lr", "epoch/train_loss_l1", "epoch/val_mse"} <= set(
        events
    )
    for tag in ("train/loss", "train/loss_mse", "epoch/train_loss_mse", "epoch/ema_val_mse"):
        assert events[tag] == expected[tag], tag  # no step lost or repeated across the resume
    assert [s for s, _ in events["train/loss"]] == list(range(1, 9))  # against the optimizer update
    steps = read_jsonl(ref / "steps.jsonl")
    assert [v for _, v in expected["train/loss_l1"]] == pytest.approx([r["loss_l1"] for r in steps], rel=1e-6)


def test_without_tensorboard_no_event_files_and_no_error(tmp_path, monkeypatch):
    import rapidnet.engine.callbacks as callbacks

    monkeypatch.setattr(callbacks, "tensorboard_available", lambda: False)
    out = tmp_path / "run"
    cfg = _toy_config(out, **{"train.epochs": 1, "ema.enabled": False})
    trainer = Trainer(_ToyTask(cfg, steps=2), cfg, progress=False)
    assert trainer.fit().status == "completed"
    assert not (out / "tensorboard").exists() and (out / "log.jsonl").is_file()
    names = [type(c).__name__ for c in trainer.callbacks]
    assert names == ["BatchNormAveraging", "BestCheckpoint", "ExportBest"]


def test_distillation_loss_parts_leave_the_total_bit_for_bit():
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randint(0, 5, (6,))
    outputs = (torch.randn(6, 5), torch.randn(6, 5))
    for kind in ("hard", "soft"):
        loss = DistillationLoss(torch.nn.CrossEntropyLoss(), torch.nn.Linear(4, 5), kind, 0.3, 2.0)
        total, parts = loss.parts(x, outputs, y)
        assert torch.equal(total, loss(x, outputs, y)) and set(parts) == {"loss_cls", "loss_distill"}
        assert total.item() == pytest.approx(0.7 * parts["loss_cls"].item() + 0.3 * parts["loss_distill"].item())
    single, parts = DistillationLoss(torch.nn.CrossEntropyLoss(), torch.nn.Identity(), "none", 0.0, 1.0).parts(
        x, outputs[0], y
    )
    assert parts == {} and torch.equal(single, torch.nn.functional.cross_entropy(outputs[0], y))


def test_engine_formats_the_tasks_facts_and_metrics():
    from rapidnet.engine.trainer import format_facts, format_metrics

    facts = {"data": {"path": "d", "train images": 3, "flip": 0.5}, "augmentation": {}, "skipped": None, "n": [1, 2]}
    assert format_facts(facts) == ["data: path d, train images 3, flip 0.5", "augmentation: none", "n: [1, 2]"]
    metrics = {"top1": 61.5, "top5": 93.5, "loss": 1.36512, "images": 200}
    assert format_metrics(metrics, {"top1": "top-1", "loss": "loss"}) == "top-1 61.50  loss 1.365"
    assert format_metrics({"a": 0.25}) == "a 0.2500"


def test_a_second_selector_keeps_its_choice_and_the_trainer_reports_the_default_one(tmp_path):
    """Only the default BestCheckpoint (``publish``) sets ``trainer.best``; one a user adds (here: the worst epoch by
    the same metric) writes its own file and leaves the run's best alone."""
    from rapidnet.engine import BestCheckpoint

    out = tmp_path / "run"
    cfg = _toy_config(out, **{"train.epochs": 3, "ema.enabled": False})
    worst = BestCheckpoint("mse", higher_is_better=True, filename="worst.pt")
    trainer = Trainer(_ToyTask(cfg, steps=2), cfg, progress=False, callbacks=[worst])
    result = trainer.fit()
    log = read_jsonl(out / "log.jsonl")
    scores = [r["val_mse"] for r in log]
    assert result.best == trainer.best and trainer.best["epoch"] == 1 + scores.index(min(scores))
    assert worst.best is not None and worst.best["epoch"] == 1 + scores.index(max(scores))
    assert load_training_state(out / "worst.pt")["epoch"] == worst.best["epoch"]
    assert [r["best_epoch"] for r in log][-1] == trainer.best["epoch"]


def test_engine_modules_import_no_circle_and_callbacks_use_only_the_public_trainer_api():
    """The callbacks and the trainer meet in ``engine/hooks.py``; no engine module imports one that imports it back
    (imports for type checking count), and no built-in callback touches a private attribute of the trainer."""
    import ast
    from pathlib import Path

    import rapidnet.engine

    folder = Path(rapidnet.engine.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        deps = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rapidnet.engine."):
                deps.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[2] for a in node.names if a.name.startswith("rapidnet.engine."))
            if path.stem == "callbacks" and isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                assert not (isinstance(node.value, ast.Name) and node.value.id == "trainer"), node.attr

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in graph.get(start, ()))

    circles = [module for module in graph if module != "__init__" and reaches(module, module, {module})]
    assert circles == []
    assert "trainer" not in graph["callbacks"] and "callbacks" not in graph["hooks"]
