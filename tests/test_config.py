"""Config files, inheritance, overrides and validation; the shipped configs hold the paper's recipe."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from rapidnet.cli.main import main
from rapidnet.config import (
    Config,
    TrainConfig,
    build_section,
    config_diff,
    config_from_dict,
    config_to_dict,
    constraint_of,
    field_requirement,
    load_config,
    parse_override,
    scaled_lr,
)
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


@pytest.mark.parametrize("name", ["fashion_mnist_rapidnet_ti.yaml", "fashion_mnist_rapidnet_ti_demo.yaml"])
def test_fashion_mnist_config_is_a_short_cpu_schedule(name):
    cfg = load_config(CONFIGS / name)
    assert (cfg.data.path, cfg.data.input_size, cfg.data.pipeline) == ("fashion-mnist", 32, "tensor")
    assert cfg.distill.type == "none" and cfg.model.distillation is None
    assert cfg.train.epochs <= 10 and cfg.train.channels_last and cfg.train.time_budget is None


def test_the_demo_is_the_7_epoch_recipe_shortened():
    """make demo trains the 7-epoch recipe (the mosaic backbones' first stage) with only its length, batch, warm-up
    and regularization changed, so what the two teach stays comparable."""
    demo, full = (config_to_dict(load_config(CONFIGS / f"fashion_mnist_rapidnet_ti{s}.yaml")) for s in ("_demo", ""))
    changed = {k for k, _, _ in config_diff(full, demo)}
    assert changed == {"train.epochs", "train.output", "data.batch_size", "sched.warmup_epochs", "aug.hflip",
                       "aug.crop_padding", "model.drop_path_rate"}  # fmt: skip
    assert "fashion_mnist_rapidnet_ti_demo.yaml" in (CONFIGS.parent / "Makefile").read_text()


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


# ---- constraints declared on the fields ------------------------------------------------------------------------------


def _sections() -> list[tuple[str, type]]:
    """Every typed section: the config's own (``model``, ``data``...) and each dense task's ``task:`` options, found
    from the dataclasses themselves so that a new section or field is walked without touching this test."""
    from rapidnet.tasks import TASKS

    hints = typing.get_type_hints(Config)
    sections = [(f.name, hints[f.name]) for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])]
    return sections + [("task", task.options) for task in TASKS.values() if hasattr(task, "options")]


def _shown(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _forms(cls: type, name: str) -> tuple[list[Any], list[Any]]:
    """The plain types a field takes, and the element types of the lists it takes (None aside)."""
    tp = typing.get_type_hints(cls)[name]
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    args = [a for a in (typing.get_args(tp) if union else (tp,)) if a is not type(None)]
    lists = [typing.get_args(a)[0] for a in args if typing.get_origin(a) is list]
    return [a for a in args if typing.get_origin(a) is not list], lists


def _boundary_cases(cls: type, name: str) -> list[tuple[Any, bool, str | None]]:
    """``(value, accepted, the bound its message must show)``: each limit of the field's constraint, and one step
    beyond it; each choice and one that is not; an empty value; a list one element too long and too short."""
    c = constraint_of(next(f for f in dataclasses.fields(cls) if f.name == name))
    plain, lists = _forms(cls, name)  # int | list[int]: the plain form is walked
    integral = (plain or lists)[0] is int

    def wrap(v: Any) -> Any:
        return v if plain else [v] * (c.length or 1)

    cases: list[tuple[Any, bool, str | None]] = []
    for bound, inclusive, upper in ((c.ge, True, False), (c.gt, False, False), (c.le, True, True), (c.lt, False, True)):
        if bound is None:
            continue
        step = 1 if integral else max(abs(bound), 1.0) * 1e-6
        beyond, within = (bound + step, bound - step) if upper else (bound - step, bound + step)
        if inclusive:
            cases += [(wrap(bound), True, None), (wrap(beyond), False, _shown(bound))]
        else:
            cases += [(wrap(within), True, None), (wrap(bound), False, _shown(bound))]
    if c.choices:
        cases += [(wrap(choice), True, None) for choice in c.choices] + [(wrap("not-a-choice"), False, None)]
    if c.nonempty and lists:
        cases += [([], False, None), ([c.ge if c.ge is not None else "x"], True, None)]
    elif c.nonempty:
        cases += [("  ", False, None), ("x", True, None)]
    if c.length is not None:
        good = wrap(c.ge if c.ge is not None else c.gt + 1 if c.gt is not None else 0.5)
        cases += [(good, True, None), (good + good[:1], False, None), (good[:1], False, None)]
    return cases


def _walk() -> list[tuple[str, type, str]]:
    return [(prefix, cls, f.name) for prefix, cls in _sections() for f in dataclasses.fields(cls) if constraint_of(f)]


def test_the_walk_reaches_every_section_and_the_constraints_that_matter():
    walked = {(prefix, cls.__name__, name) for prefix, cls, name in _walk()}
    assert {prefix for prefix, _, _ in walked} == {"model", "data", "aug", "optim", "sched", "ema", "distill", "train",
                                                   "task"}  # fmt: skip
    assert {"DetectionOptions", "SegmentationOptions"} <= {cls for _, cls, _ in walked}
    keys = ("train.epochs", "data.batch_size", "aug.zoom", "distill.type", "train.time_budget", "task.min_size",
            "task.crop_size", "task.hflip", "task.trainable_stages", "task.bootstrap", "task.select_on")  # fmt: skip
    for key in keys:
        assert any(f"{prefix}.{name}" == key for prefix, _, name in walked), key


@pytest.mark.parametrize(("prefix", "cls", "name"), _walk(), ids=lambda v: getattr(v, "__name__", v))
def test_every_constrained_field_is_refused_outside_and_accepted_at_its_bounds(prefix, cls, name):
    """Each constraint, read from the field's metadata: the bound itself passes, one step beyond is a one-line error
    that names where the value came from, the key, and the requirement (with the bound)."""
    key = f"{prefix}.{name}"
    cases = _boundary_cases(cls, name)
    assert cases, key
    constraint = constraint_of(next(f for f in dataclasses.fields(cls) if f.name == name))
    for value, accepted, bound in cases:
        try:
            built = build_section(cls, {name: value}, prefix=prefix, source="walk.yaml")
        except ConfigError as e:
            message = str(e)
            assert not accepted, (key, value, message)
            assert "\n" not in message and message.startswith(f"walk.yaml: {key}"), message
            where, requirement = message.split(" must be ", 1)
            if bound is not None:
                assert bound in requirement, (message, bound)
            if where.endswith("]"):  # one element of a list: its own requirement
                integral = _forms(cls, name)[1][0] is int
                assert requirement.startswith(f"{constraint.item_text(integral)}, got "), message
            else:
                assert where == f"walk.yaml: {key}", message
                assert requirement.startswith(f"{field_requirement(cls, name)}, got "), message
        else:
            assert accepted, (key, value, "was accepted")
            assert getattr(built, name) == value


@pytest.mark.parametrize(("prefix", "cls"), _sections(), ids=lambda v: getattr(v, "__name__", v))
def test_defaults_of_every_section_pass_their_own_constraints(prefix, cls):
    """Every default, given back as a value, is checked like one from a file and accepted unchanged."""
    defaults = dataclasses.asdict(cls())
    assert dataclasses.asdict(build_section(cls, defaults, prefix=prefix, source="defaults")) == defaults


def test_the_default_config_passes_its_checks_across_fields_too():
    assert config_to_dict(config_from_dict(config_to_dict(Config()))) == config_to_dict(Config())


def test_constraints_describe_themselves():
    from rapidnet.config import Constraint

    assert Constraint(ge=1, le=1000).describe(integral=True) == "1..1000"
    assert Constraint(ge=0.0, lt=1.0).describe() == "in [0, 1)"
    assert Constraint(gt=0.0).describe(nullable=True) == "positive or null"
    assert Constraint(choices=("none", "hard", "soft")).describe() == "one of none, hard, soft"
    assert Constraint(length=2, ge=4, le=4096, unit="pixels").describe(True, True) == (
        "a [min, max] pair, each 4..4096 pixels, or null"
    )
    assert Constraint(gt=0, le=100_000, unit="minutes").describe(nullable=True) == (
        "more than 0 and at most 100000 minutes, or null"
    )
    assert field_requirement(TrainConfig, "epochs") == "1..100000"
    assert field_requirement(TrainConfig, "device") is None


def test_old_checks_keep_their_accepted_values():
    """What the hand-written checks accepted and refused, now declared on the fields."""
    for good in (["data.eval_batch_size=null"], ["model.drop_path_rate=0"], ["data.crop_pct=1"],
                 ["aug.zoom=[32, 80]"], ["sched.warmup_epochs=0.5", "sched.step_on_epochs=false"],
                 ["sched.decay_milestones=[-3]", "train.epochs=3"], ["optim.betas=[0.9, 0.999]"],
                 ["aug.repeats=64"], ["train.time_budget=100000"]):  # fmt: skip
        load_config(overrides=good)
    for bad, message in (
        (["aug.repeats=0"], "aug.repeats must be 1..64, got 0"),
        (["aug.repeats=65"], "aug.repeats must be 1..64, got 65"),
        (["model.drop_path_rate=1"], "model.drop_path_rate must be in [0, 1), got 1.0"),
        (["data.crop_pct=0"], "data.crop_pct must be in (0, 1] or null, got 0.0"),
        (["aug.zoom=[80, 32]"], "aug.zoom must be [min, max] with min <= max, got [80, 32]"),
        (["aug.zoom=[3, 32]"], "aug.zoom[0] must be 4..4096 pixels, got 3"),
        (["sched.warmup_epochs=0.5"], "sched.warmup_epochs must be whole epochs where sched.step_on_epochs is true"),
        (["sched.decay_milestones=[-4]", "train.epochs=3"], "sched.decay_milestones must be epochs"),
        (["model.kwargs={drop_rate: 0.1}"], "set model.drop_rate, not model.kwargs.drop_rate"),
        (["distill.type=soft", "distill.teacher=t", "model.distillation=false"], "needs model.distillation true"),
        (["model.checkpoint=' '"], "model.checkpoint must be a file (or model name) or null, got ' '"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(overrides=bad)
        assert message in str(info.value) and "\n" not in str(info.value), (bad, str(info.value))


def test_messages_name_the_override_the_flag_or_the_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 0}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: train\.epochs must be 1\.\.100000, got 0$"):
        load_config(path, ["train.seed=1"])  # another key overridden: the bad one still came from the file
    path.write_text("train: {epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"^--set train\.epochs=0: train\.epochs must be 1\.\.100000, got 0$"):
        load_config(path, ["train.epochs=0"])
    with pytest.raises(ConfigError, match=r"^--set train=\{epochs: 0\}: train\.epochs must be"):
        load_config(path, ["train={epochs: 0}"])  # a whole section set by one override
    with pytest.raises(ConfigError, match=r"^--epochs: train\.epochs must be"):
        load_config(path, ["train.epochs=5"], values={"train.epochs": 0}, sources={"train.epochs": "--epochs"})
    with pytest.raises(ConfigError, match=r"^command line: train\.epochs must be"):
        load_config(path, values={"train.epochs": 0})  # no flag named
    # through the command line itself: cli/train.py names the flag that set the key
    for argv, line in (
        (["--config", path, "--set", "train.epochs=0"], "--set train.epochs=0: train.epochs must be 1..100000, got 0"),
        (["--config", path, "--teacher", ""], "--teacher: distill.teacher must be a file (or model name) or null"),
        (["--config", path, "--distillation", "soft"], "--distillation: distill.type is 'soft' but no teacher"),
    ):
        assert main(["train", *map(str, argv), "--output", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and line in err[0], (argv, err)
    assert not (tmp_path / "run").exists()


def test_dense_task_options_are_checked_naming_task_keys(tmp_path):
    """The ``task:`` mapping of a dense config goes through the same machinery: one line naming ``task.KEY`` and
    where it came from; the saved config keeps ``task:`` as given (old checkpoints load)."""
    from rapidnet.tasks import TASKS

    path = tmp_path / "det.yaml"
    path.write_text("task: {name: detection, min_size: 8}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: task\.min_size must be .*16\.\.4096 pixels"):
        TASKS["detection"](load_config(path))
    path.write_text("task: {name: segmentation, crop_size: [64, 64]}\n")
    for override, message in (
        ("task.crop_size=[64]", "--set task.crop_size=[64]: task.crop_size must be a [height, width] pair"),
        ("task.crop_size=[8, 64]", "--set task.crop_size=[8, 64]: task.crop_size[0] must be 16..4096 pixels, got 8"),
        ("task.hflip=1.5", "--set task.hflip=1.5: task.hflip must be in [0, 1], got 1.5"),
        ("task.trainable_stages=6", "task.trainable_stages must be 0..5, got 6"),
        ("task.bootstrap=-1", "task.bootstrap must be 0..100000, got -1"),
        ("task.photometric=maybe", "task.photometric must be bool, got 'maybe'"),
        ("task.frozen_bn=cold", "task.frozen_bn must be one of true, false, frozen, eval, train, got 'cold'"),
        ("task.min_size=64", "unknown config key 'task.min_size' (known task: name, num_classes"),
    ):
        with pytest.raises(ConfigError) as info:
            TASKS["segmentation"](load_config(path, [override]))
        assert message in str(info.value) and "\n" not in str(info.value), (override, str(info.value))
    with pytest.raises(ConfigError, match=r"^config: task\.max_size must be 16\.\.4096 pixels, got 5$"):
        TASKS["detection"](config_from_dict({"task": {"name": "detection", "max_size": 5}}))
    with pytest.raises(ConfigError, match="rapidnet det train"):  # the task name is checked first
        TASKS["segmentation"](config_from_dict({"task": {"name": "detection", "min_size": 5}}))
    cfg = load_config(path, ["task.hflip=0"])
    task = TASKS["segmentation"](cfg)
    assert task.opts.hflip == 0.0 and task.opts.crop_size == [64, 64] and task.opts.scale == [2048, 512]
    assert config_to_dict(cfg)["task"] == {"name": "segmentation", "crop_size": [64, 64], "hflip": 0}


def test_dense_options_keep_the_keys_and_defaults_of_the_task_sections():
    """The dataclasses that replaced the two ``task:`` dicts: the same keys, the same defaults."""
    from rapidnet.tasks.detection import DetectionOptions
    from rapidnet.tasks.segmentation import SegmentationOptions

    shared = {"num_classes": None, "backbone_checkpoint": None, "trainable_stages": 5, "backbone_lr_scale": 1.0,
              "hflip": 0.5, "select_on": None, "bootstrap": 1000, "model_kwargs": {}}  # fmt: skip
    assert dataclasses.asdict(DetectionOptions()) == {
        **shared, "name": "detection", "frozen_bn": True, "min_size": 800, "max_size": 1333, "test_size": None,
        "train_split": None, "val_split": None, "dev_masks": False,
    }  # fmt: skip
    assert dataclasses.asdict(SegmentationOptions()) == {
        **shared, "name": "segmentation", "frozen_bn": False, "scale": [2048, 512], "test_scale": None,
        "ratio_range": [0.5, 2.0], "crop_size": [512, 512], "cat_max_ratio": 0.75, "photometric": True,
        "reduce_zero_label": None,
    }  # fmt: skip
    assert SegmentationOptions().scale is not SegmentationOptions().scale  # a list default is each instance's own


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_its_task_takes_it(path):
    from rapidnet.tasks import TASKS

    cfg = load_config(path)
    task = TASKS[cfg.task.get("name", "classification")](cfg)
    assert task.cfg is cfg
