"""Property-style tests of the loaders that read untrusted files: a seeded generator of our own (no extra dependency)
throws hundreds of mutated configs and checkpoint metadata at ``rapidnet.config.load_config`` and ``rapidnet.load``.

The property, for every input: a valid result, or a :class:`~rapidnet.errors.RapidNetError` whose message is one
line; never another exception; and the whole run within a bounded amount of memory (the peak resident set, torch's
allocations included). A failure prints the case number and the mutation, so ``CASES[n]`` replays it.

Configs are mutated both as trees (wrong types, huge numbers, unknown keys, deep nesting) and as YAML text (aliases,
tags, corruption, invalid UTF-8). Checkpoints reuse three saved weight files (a micro RapidNet, a micro Semantic FPN,
a tiny timm peer) and mutate only their safetensors metadata (``pretrained_cfg``, ``class_names``, ``build_args``,
``eval_args``, architecture and variant keys), rewriting the header in place.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import rapidnet
from conftest import MICRO
from rapidnet.config import Config, config_to_dict, load_config
from rapidnet.constants import MAX_SIDE, MIN_SIDE
from rapidnet.errors import RapidNetError
from rapidnet.models.checkpoint import is_features_model, model_metadata
from test_reliability_inputs import peak_memory_growth

ROOT = Path(__file__).resolve().parents[1]
SEED = 16
N_CONFIGS = 400
N_CHECKPOINTS = 400
MB = 1 << 20
MEMORY_BOUND = 256 * MB  # far below what any of the bombs would take (gigabytes), above a few model builds


# ---- adversarial values --------------------------------------------------------------------------------------------


def scalar(rng: random.Random) -> Any:
    """One value of the kind that breaks loaders: wrong types, extreme and non-finite numbers, odd strings."""
    return rng.choice(
        [
            lambda: rng.randint(-5, 5),
            lambda: 10 ** rng.choice([3, 9, 20, 300]),
            lambda: -(10 ** rng.choice([3, 9, 20])),
            lambda: rng.choice([0.0, -0.0, 1e-300, 1e308, -1e308, 0.5, 1.0, 2.5]),
            lambda: float(rng.choice(["inf", "-inf", "nan"])),
            lambda: rng.choice([True, False, None]),
            lambda: rng.choice(["", "abc", "bicubic", "rapidnet_ti", "resnet50", "timm", "1e-3", "-1", "null"]),
            lambda: "x" * rng.choice([300, 5000]),
            lambda: rng.choice(["a\nb", "tab\there", "\x00", "é", "{", "[", "*alias", "&anchor", "!!python/name:os"]),
        ]
    )()


def value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON/YAML-able tree (lists and dicts of adversarial scalars), at most 4 levels deep."""
    kind = rng.random()
    if depth >= 4 or kind < 0.6:
        return scalar(rng)
    if kind < 0.8:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {str(scalar(rng))[:20]: value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def nested_text(rng: random.Random) -> str:
    """Deep nesting as text (a Python tree that deep could not even be dumped)."""
    depth = rng.choice([40, 500, 5000])
    return "[" * depth + "]" * depth if rng.random() < 0.5 else "{a: " * depth + "1" + "}" * depth


def laughs(rng: random.Random, indent: str = "  ") -> str:
    """Nested anchors and aliases: ``levels`` levels of 9 aliases each expand to 9^levels nodes."""
    levels = rng.choice([2, 5, 9])
    lines = [f"{indent}l0: &l0 [" + ", ".join(['"lol"'] * 9) + "]"]
    lines += [f"{indent}l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# ---- configs -------------------------------------------------------------------------------------------------------


def _leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, item in tree.items():
        out += _leaves(item, (*prefix, key)) if isinstance(item, dict) and item else [(*prefix, key)]
    return out


def _set(tree: dict[str, Any], path: tuple[str, ...], item: Any) -> None:
    for part in path[:-1]:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    tree[path[-1]] = item


def mutate_config_tree(rng: random.Random, tree: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    tree = copy.deepcopy(tree)
    leaves = _leaves(tree)
    how = rng.choice(["leaf", "leaf", "leaf", "unknown", "delete", "section", "kwargs"])
    if how == "leaf":
        path = rng.choice(leaves)
        _set(tree, path, value(rng))
    elif how == "unknown":
        path = (*rng.choice(leaves)[:-1], rng.choice(["lrr", "epoch", "Batch_Size", "x" * 300, "123"]))
        _set(tree, path, value(rng))
    elif how == "delete":
        path = rng.choice(leaves)
        node = tree
        for part in path[:-1]:
            node = node[part]
        node.pop(path[-1], None)
    elif how == "section":
        path = (rng.choice(list(tree)),)
        _set(tree, path, value(rng))
    else:
        path = ("model", "kwargs")
        _set(tree, path, {rng.choice(["depths", "widths", "head_dim", "num_classes", "bogus"]): value(rng)})
    return f"tree:{how}:{'.'.join(map(str, path))}", tree


def mutate_config_text(rng: random.Random, text: str) -> tuple[str, str | bytes]:
    how = rng.choice(["laughs", "nest", "merge", "tag", "corrupt", "truncate", "utf8", "base", "bigint", "dupe"])
    if how == "laughs":
        section = rng.choice(["task", "model", "data"])
        return how, f"{text}\n{section}:\n{laughs(rng)}" if section == "task" else f"{section}:\n{laughs(rng)}{text}"
    if how == "nest":
        return how, f"{text}\ntask:\n  deep: {nested_text(rng)}\n"
    if how == "merge":
        return how, "defaults: &d {epochs: 2}\ntrain:\n  <<: *d\n"
    if how == "tag":
        tag = rng.choice(
            ["!!python/object/apply:os.system [echo hi]", "!!binary aGk=", "!!set {a}", "!!timestamp 2001"]
        )
        return how, f"{text}\ntrain:\n  seed: {tag}\n"
    if how == "corrupt":
        chars = list(text)
        for _ in range(rng.randint(1, 8)):
            chars[rng.randrange(len(chars))] = rng.choice([":", "\t", "[", "{", "&", "*", "!", "%", "\x07", "-", "'"])
        return how, "".join(chars)
    if how == "truncate":
        return how, text[: rng.randrange(len(text))]
    if how == "utf8":
        blob = bytearray(text.encode())
        blob[rng.randrange(len(blob))] = rng.choice([0xFF, 0xC3, 0x80, 0x00])
        return how, bytes(blob)
    if how == "base":
        base = rng.choice(["[1, 2]", "5", "self.yaml", "missing.yaml", "''", "[null]", "{a: 1}", "."])
        return how, f"base: {base}\n{text}"
    if how == "bigint":
        return how, f"{text}\ntrain:\n  epochs: {'9' * rng.choice([30, 4000, 5000])}\n"
    return how, f"{text}\ntrain:\n  epochs: 1\ntrain:\n  epochs: 2\n"


def _check_config_result(result: Any) -> None:
    """A valid config is a Config whose dumped form is small; an error is a RapidNetError of one line."""
    if isinstance(result, RapidNetError):
        message = str(result)
        assert "\n" not in message and 0 < len(message) < 2000, message[:300]
    else:
        assert isinstance(result, Config), type(result)
        assert len(json.dumps(config_to_dict(result), default=str)) < 4 * MB


def test_mutated_configs_are_loaded_or_refused_in_one_line(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    texts = {p.name: p.read_text() for p in sorted(configs.glob("*.yaml"))}
    tree = config_to_dict(Config())
    rng = random.Random(SEED)
    outcomes = {"valid": 0, "refused": 0}

    def run_all() -> None:
        for n in range(N_CONFIGS):
            if rng.random() < 0.5:
                how, mutated = mutate_config_tree(rng, tree)
                data: str | bytes = yaml.safe_dump(mutated, allow_unicode=True)
            else:
                name = rng.choice(list(texts))
                how, data = mutate_config_text(rng, texts[name])
                how = f"{name}:{how}"
            path = configs / f"case{n}.yaml"
            (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)  # type: ignore[operator]
            overrides = [f"train.seed={scalar(rng)}"] if rng.random() < 0.2 else []
            try:
                result: Any = load_config(path, overrides=overrides)
            except RapidNetError as e:
                result = e
            except Exception as e:  # the property: nothing but a RapidNetError
                raise AssertionError(f"case {n} ({how}): {type(e).__name__}: {e}") from e
            try:
                _check_config_result(result)
            except AssertionError as e:
                raise AssertionError(f"case {n} ({how}): {e}") from None
            outcomes["refused" if isinstance(result, RapidNetError) else "valid"] += 1

    _, grown = peak_memory_growth(run_all)
    assert grown < MEMORY_BOUND, f"peak memory grew by {grown / MB:.0f} MB"
    assert min(outcomes.values()) >= N_CONFIGS // 20, outcomes  # the mutations reach both outcomes


# ---- checkpoint metadata -------------------------------------------------------------------------------------------


def read_header(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file as (its JSON header, the tensor bytes after it)."""
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


def write_with_metadata(path: Path, header: dict[str, Any], data: bytes, metadata: dict[str, Any]) -> None:
    """The same tensors under another ``__metadata__`` (any JSON: safetensors itself refuses non-string values)."""
    encoded = json.dumps({**header, "__metadata__": metadata}).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def base_files(tmp_path: Path) -> dict[str, tuple[dict[str, Any], bytes, dict[str, str]]]:
    """Three real files to mutate: a micro RapidNet classifier, a micro Semantic FPN, a tiny timm peer."""
    import timm

    from rapidnet.models.segmentation import semantic_fpn

    model = rapidnet.create_model("rapidnet_ti", num_classes=3, **MICRO)
    meta = {
        "class_names": json.dumps(["cat", "dog", "emu"]),
        "pretrained_cfg": json.dumps({"input_size": [3, 32, 32], "crop_pct": 1.0, "interpolation": "bicubic"}),
    }
    rapidnet.save_weights(model, tmp_path / "rapidnet.safetensors", meta)
    peer = timm.create_model("test_resnet", num_classes=2)
    rapidnet.save_weights(peer, tmp_path / "timm.safetensors", {"class_names": json.dumps(["coat", "shirt"])})
    dense = semantic_fpn("rapidnet_ti", num_classes=3, backbone_kwargs=dict(MICRO), fpn_channels=16, head_channels=8)
    from safetensors.torch import save_file

    dense_meta = {
        "format": "rapidnet-segmentation",
        "task": "segmentation",
        "build_args": json.dumps(dense.build_args),
        "class_names": json.dumps(["a", "b", "c"]),
        "eval_args": json.dumps({"num_classes": 3, "reduce_zero_label": False, "scale": [64, 64]}),
    }
    save_file(
        {k: v.contiguous() for k, v in dense.state_dict().items()}, str(tmp_path / "dense.safetensors"), dense_meta
    )
    out = {}
    for name in ("rapidnet", "timm", "dense"):
        header, data = read_header(tmp_path / f"{name}.safetensors")
        out[name] = (header, data, dict(header.get("__metadata__", {})))
    assert out["rapidnet"][2]["format"] == "rapidnet" and model_metadata(model)["arch"] == "custom"
    return out


_VALID_CFG = {
    "input_size": [3, 32, 32],
    "crop_pct": 0.9,
    "interpolation": "bicubic",
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
}
_TIMM_NAMES = ["test_resnet", "test_vit", "resnet50", "vit_giant_patch14_clip_224", "no_such_model", "rapidnet_ti", ""]


def _json_or_not(rng: random.Random, item: Any) -> str:
    """Mostly the JSON of ``item``; sometimes text that is not JSON, or JSON nested thousands deep."""
    roll = rng.random()
    if roll < 0.08:
        return rng.choice(["{", "[1, 2", "NaN", "'quoted'", "\x00", "", "1e999", '{"a": }'])
    if roll < 0.12:
        return nested_text(rng).replace("{a: ", '{"a": ')
    return json.dumps(item)


_CLASSES = {"rapidnet": 3, "timm": 2, "dense": 3}


def benign_metadata(rng: random.Random, kind: str, stored: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """Valid variations (another eval transform, other class names, extra keys): these must load, and be usable."""
    cfg = {
        "input_size": [3, rng.randint(16, 96), rng.randint(16, 96)],
        "crop_pct": rng.choice([0.5, 0.875, 1.0]),
        "interpolation": rng.choice(["bilinear", "bicubic", "nearest"]),
        "mean": [rng.random() for _ in range(3)],
        "std": [rng.random() + 0.1 for _ in range(3)],
    }
    names = [f"class {i} ({rng.randint(0, 99)})" for i in range(_CLASSES[kind])]
    meta = dict(stored, class_names=json.dumps(names), note=str(scalar(rng))[:200])
    if kind != "dense":
        meta["pretrained_cfg"] = json.dumps({k: v for k, v in cfg.items() if rng.random() < 0.7})
    return f"{kind}: benign", meta


def mutate_metadata(rng: random.Random, kind: str, stored: dict[str, str]) -> tuple[str, dict[str, Any]]:
    if rng.random() < 0.2:
        return benign_metadata(rng, kind, stored)
    meta: dict[str, Any] = dict(stored)
    changes = []
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(
            ["pretrained_cfg", "pretrained_cfg", "class_names", "class_names", "format", "arch", "task", "num_classes",
             "head_dim", "in_chans", "distillation", "reparameterized", "depths", "widths", "extra"]
            + (["build_args"] * 4 + ["eval_args"] * 2 if kind == "dense" else [])
        )  # fmt: skip
        if key == "pretrained_cfg":
            cfg = dict(_VALID_CFG)
            field = rng.choice([*cfg, "test_input_size", "crop_mode", "num_classes", "file", "classifier"])
            cfg[field] = rng.choice([value(rng), [3, rng.choice([8, 64, 40000, -3]), 64], [3.0, 32, 32], "abc"])
            item: Any = _json_or_not(rng, cfg if rng.random() < 0.8 else value(rng))
        elif key == "class_names":
            names = [scalar(rng) if rng.random() < 0.3 else f"c{i}" for i in range(rng.choice([0, 1, 2, 3, 4]))]
            item = _json_or_not(rng, names if rng.random() < 0.8 else value(rng))
        elif key == "build_args":
            args = json.loads(stored["build_args"])
            field = rng.choice([*args, "backbone_checkpoint", "box_detections_per_img", "min_size"])
            args[field] = rng.choice(
                [value(rng), 10 ** rng.choice([4, 7, 12]), rng.choice(_TIMM_NAMES), {"depths": value(rng)}]
            )
            item = _json_or_not(rng, args)
        elif key == "eval_args":
            item = _json_or_not(rng, {"num_classes": scalar(rng), "scale": rng.choice([value(rng), [40000, 40000]])})
        elif key in ("format", "arch"):
            item = rng.choice([*_TIMM_NAMES, "timm", "rapidnet", "rapidnet-detection", str(scalar(rng))])
        elif key == "task":
            item = rng.choice(["classification", "detection", "segmentation", "poetry", "", str(scalar(rng))])
        elif key in ("depths", "widths"):
            item = _json_or_not(rng, value(rng))
        else:
            item = str(scalar(rng))
        if rng.random() < 0.03:
            item = value(rng)  # not even a string: safetensors itself refuses the header
        meta[key] = item
        changes.append(f"{key}={str(item)[:60]!r}")
    return f"{kind}: {'; '.join(changes)}", meta


def _check_load_result(result: Any) -> None:
    """A loaded model is safe to use as loaded: names fit the outputs, the eval transform is within bounds."""
    if isinstance(result, RapidNetError):
        message = str(result)
        assert "\n" not in message and 0 < len(message) < 2000, message[:300]
        return
    net, meta = result
    assert isinstance(net, nn.Module) and isinstance(meta, dict)
    names, outputs = meta.get("class_names"), getattr(net, "num_classes", None)
    if names is not None and isinstance(outputs, int) and meta.get("task") is None:
        assert all(isinstance(n, str) and "\n" not in n for n in names) and len(names) in (0, outputs)
    size = (getattr(net, "pretrained_cfg", None) or {}).get("input_size")
    if size is not None:
        assert all(MIN_SIDE <= side <= MAX_SIDE for side in size[1:]), size
    if meta.get("task") is None and not is_features_model(net):
        _predict_once(net)


def _predict_once(net: nn.Module) -> None:
    """What ``rapidnet predict`` does with a loaded classifier: its stored eval transform, then a forward pass."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from rapidnet.cli.predict import channel_config

    config = channel_config(resolve_data_config(model=net))
    x = create_transform(**config)(Image.new("RGB", (40, 30), (90, 120, 30)).convert(
        "L" if config["input_size"][0] == 1 else "RGB"))  # fmt: skip
    assert tuple(x.shape) == tuple(config["input_size"]), (x.shape, config)
    with torch.no_grad():
        out = net(x.unsqueeze(0))
    assert out.shape[0] == 1


class _HubReached(BaseException):
    """Raised where loading would fetch the authors' weights: a file must never make it reach the network."""


def _no_hub(cfg: Any) -> str:
    raise _HubReached(f"a file made loading fetch weights from the hub ({cfg.get('hf_hub_id')})")


def test_mutated_checkpoint_metadata_is_loaded_or_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(rapidnet.models.checkpoint, "hub_weights_file", _no_hub)
    bases = base_files(tmp_path)
    rng = random.Random(SEED)
    outcomes = {"valid": 0, "refused": 0}

    def run_all() -> None:
        for n in range(N_CHECKPOINTS):
            kind = rng.choice(["rapidnet", "rapidnet", "timm", "dense"])
            header, data, stored = bases[kind]
            how, meta = mutate_metadata(rng, kind, stored)
            path = tmp_path / f"case{n % 8}.safetensors"
            write_with_metadata(path, header, data, meta)
            options = rng.choice([{}, {}, {"task": "classification"}, {"features_only": True}, {"model": kind}])
            if options.get("model") == "rapidnet":
                options["model"] = "rapidnet_ti"
            elif options.get("model") in ("timm", "dense"):
                options["model"] = "test_resnet"
            how += f" {options}"
            try:
                result: Any = rapidnet.load(path, **options)
            except RapidNetError as e:
                result = e
            except Exception as e:  # the property: nothing but a RapidNetError
                raise AssertionError(f"case {n} ({how}): {type(e).__name__}: {e}") from e
            try:
                _check_load_result(result)
            except AssertionError as e:
                raise AssertionError(f"case {n} ({how}): {e}") from None
            outcomes["refused" if isinstance(result, RapidNetError) else "valid"] += 1

    _, grown = peak_memory_growth(run_all)
    assert grown < MEMORY_BOUND, f"peak memory grew by {grown / MB:.0f} MB"
    assert min(outcomes.values()) >= N_CHECKPOINTS // 10, outcomes


def test_the_generators_are_seeded():
    """The same seed gives the same cases, so a failure's case number replays it."""
    tree, stored = config_to_dict(Config()), {"format": "rapidnet", "class_names": "[]"}

    def cases(rng: random.Random) -> list[str]:
        return [repr((mutate_config_tree(rng, tree), mutate_metadata(rng, "rapidnet", stored))) for _ in range(20)]

    assert cases(random.Random(SEED)) == cases(random.Random(SEED))
