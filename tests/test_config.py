"""Config files, inheritance, overrides and validation; the shipped configs hold the paper's recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from rapidnet.cli.main import main
from rapidnet.config import config_diff, config_to_dict, load_config, parse_override, scaled_lr
from rapidnet.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_imagenet_configs_hold_the_papers_recipe():
    for variant in ("ti", "s", "m", "b"):
        cfg = load_config(CONFIGS / f"imagenet_rapidnet_{variant}.yaml")
        assert cfg.model.name == f"rapidnet_{variant}" and cfg.model.drop_path_rate == 0.1
        assert cfg.train.epochs == 300
        o, s, a, e, d = cfg.optim, cfg.sched, cfg.aug, cfg.ema, cfg.distill
        assert (o.opt, o.base_lr, o.lr_base_size, o.lr) == ("adamw", 2e-3, 1024, None)
        assert (o.weight_decay, o.eps) == (0.05, 1e-8)
        assert (s.name, s.warmup_epochs, s.warmup_lr, s.min_lr) == ("cosine", 20, 1e-6, 1e-5)
        assert (a.auto_augment, a.color_jitter, a.train_interpolation) == ("rand-m9-mstd0.5-inc1", 0.4, "random")
        assert (a.mixup, a.cutmix, a.mixup_switch_prob, a.smoothing) == (0.8, 1.0, 0.5, 0.1)
        assert (a.re_prob, a.re_mode, a.repeated_aug) == (0.25, "pixel", True)
        assert (e.enabled, e.decay) == (True, 0.99996)
        assert (d.type, d.alpha, d.tau, d.teacher) == ("hard", 0.5, 1.0, "regnety_160.deit_in1k")
        assert (cfg.data.input_size, cfg.data.crop_pct, cfg.data.interpolation) == (224, 0.9, "bicubic")
        assert cfg.train.sync_bn
        # 8 processes x 128 = the paper's 1024; the rule keeps the recipe on other process counts
        assert scaled_lr(o, 8 * cfg.data.batch_size) == pytest.approx(2e-3)
        assert scaled_lr(o, 4 * cfg.data.batch_size) == pytest.approx(1e-3)
    ti, b = (config_to_dict(load_config(CONFIGS / f"imagenet_rapidnet_{v}.yaml")) for v in ("ti", "b"))
    assert [k for k, _, _ in config_diff(ti, b)] == ["model.name", "train.output"]


def test_fashion_mnist_config_is_a_short_cpu_schedule():
    cfg = load_config(CONFIGS / "fashion_mnist_rapidnet_ti.yaml")
    assert (cfg.data.path, cfg.data.input_size, cfg.data.pipeline) == ("fashion-mnist", 32, "tensor")
    assert cfg.distill.type == "none" and cfg.model.distillation is None
    assert cfg.train.epochs <= 10 and cfg.train.channels_last


@pytest.mark.parametrize("task", ["mask_rcnn", "semantic_fpn"])
def test_mosaic_backbone_comparison_uses_one_recipe(task):
    """RapidNet-Ti and MobileNetV2 x1.4 are compared on the mosaic with the same recipe: only the names differ."""
    ti, mnv2 = (
        config_to_dict(load_config(CONFIGS / f"mosaic_{task}_{model}.yaml"))
        for model in ("rapidnet_ti", "mobilenetv2_140")
    )
    assert sorted(k for k, _, _ in config_diff(ti, mnv2)) == ["model.name", "task.backbone_checkpoint", "train.output"]
    # ... and each backbone checkpoint is the end of one two-stage Fashion-MNIST recipe, again same but names:
    # the demo classifier (32 px), then the zoom stage (garments at 32-80 px) fine-tuned from it
    pretraining = [
        config_to_dict(load_config(CONFIGS / name))
        for name in ("fashion_mnist_rapidnet_ti.yaml", "fashion_mnist_mobilenetv2_140_demo.yaml")
    ]
    zoom = [
        config_to_dict(load_config(CONFIGS / name))
        for name in ("fashion_mnist_rapidnet_ti_zoom.yaml", "fashion_mnist_mobilenetv2_140_zoom.yaml")
    ]
    assert sorted(k for k, _, _ in config_diff(*pretraining)) == ["model.name", "train.output"]
    assert sorted(k for k, _, _ in config_diff(*zoom)) == ["model.checkpoint", "model.name", "train.output"]
    for dense, pre, second in zip((ti, mnv2), pretraining, zoom, strict=True):
        assert second["model"]["checkpoint"] == f"{pre['train']['output']}/model_best.safetensors"
        assert second["aug"]["zoom"] and second["model"]["name"] == pre["model"]["name"]
        assert dense["task"]["backbone_checkpoint"] == f"{second['train']['output']}/last.pt"


def test_inheritance_overrides_and_flags_apply_in_order(tmp_path):
    (tmp_path / "parent.yaml").write_text("optim: {weight_decay: 0.1, eps: 1.0e-6}\ntrain: {epochs: 5}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\noptim: {weight_decay: 0.2}\n")
    cfg = load_config(
        tmp_path / "child.yaml",
        ["optim.lr=1e-3", "train.epochs=7", "data.mean=[0.5, 0.5, 0.5]"],
        values={"train.epochs": 9},
    )
    assert cfg.optim.weight_decay == 0.2 and cfg.optim.eps == 1e-6  # child wins, parent fills in
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML reads "1e-3" as a string
    assert cfg.train.epochs == 9 and cfg.data.mean == [0.5, 0.5, 0.5]
    assert cfg.aug.mixup == 0.8  # untouched defaults are the paper's


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("optim: {lrr: 0.1}\n", [], "unknown config key 'optim.lrr'"),
        ("optimizer: {lr: 0.1}\n", [], "unknown config key 'optimizer'"),
        ("train: {epochs: many}\n", [], "train.epochs must be int"),
        ("train: {epochs: 0}\n", [], "train.epochs must be 1..100000, got 0"),
        ("", ["data.pipeline=fast"], "data.pipeline must be one of timm, tensor"),
        ("", ["distill.type=hard"], "no teacher is given"),
        ("", ["data.mean=[0.5]"], "data.mean must be 3 numbers"),
        ("base: nowhere.yaml\n", [], "does not exist"),
        ("base: me.yaml\n", [], "inherits from itself"),
        ("train: [1, 2\n", [], "is not valid YAML"),
    ],
)
def test_bad_configs_are_one_line_errors_naming_the_key(tmp_path, text, overrides, expected):
    path = tmp_path / "me.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_override_syntax():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a=null") == (["a"], None)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("a.b")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("a..b=1")


def test_cli_reports_config_errors_in_one_line(capsys):
    assert main(["train", "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'optim.lrr'" in err[0]
