"""Engine pieces in isolation: reproducible sampling, RNG capture, optimizer groups, run logs."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

import rapidnet
from rapidnet.config import load_config
from rapidnet.engine import JsonlLog, SeededDataset, SeededSampler, read_jsonl
from rapidnet.engine.checkpoint import capture_rng, restore_rng
from rapidnet.errors import ConfigError
from rapidnet.tasks.classification import ClassificationTask, TensorBatches
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
    tb = TensorBatches(images, torch.arange(6), sampler, mean=(0.5,) * 3, std=(0.25,) * 3, hflip=0.5, padding=2)
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
    tb = TensorBatches(images, torch.arange(16), sampler, mean=(0.0,) * 3, std=(1.0,) * 3, hflip=0.5, zoom=(20, 60))
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
    noisy = TensorBatches(images // 2, torch.arange(16), sampler, mean=(0.0,) * 3, std=(1.0,) * 3, noise=8.0)
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
