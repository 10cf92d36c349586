"""What a RapidNet is, as data: :class:`ArchSpec`, read off a state dict (:func:`infer_arch`) or a live model
(:func:`model_arch`).

A checkpoint's architecture is worked out here once per read (``rapidnet.models.checkpoint.Checkpoint.arch``) and
compared with the model it loads into; the limits it must keep are those of the constructor
(``rapidnet.models.limits``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rapidnet.errors import CheckpointError
from rapidnet.models.rapidnet import DEFAULT_MLDC, VARIANTS

__all__ = ["ArchSpec", "infer_arch", "mldc_branch_count", "model_arch"]


@dataclass(frozen=True)
class ArchSpec:
    """What a state dict says about the network that wrote it."""

    depths: tuple[tuple[int, int], ...]
    widths: tuple[int, ...]
    head_dim: int
    num_classes: int
    distillation: bool
    in_chans: int
    reparameterized: bool
    mldc_dilations: tuple[int, ...] = DEFAULT_MLDC["mldc_dilations"]
    mldc_groups: int | str = DEFAULT_MLDC["mldc_groups"]
    ffn_kernel: int = DEFAULT_MLDC["ffn_kernel"]

    @property
    def mldc_args(self) -> dict[str, Any]:
        """The MLDC constructor arguments (``mldc_dilations``, ``mldc_groups``, ``ffn_kernel``)."""
        return {"mldc_dilations": self.mldc_dilations, "mldc_groups": self.mldc_groups, "ffn_kernel": self.ffn_kernel}

    @property
    def build_args(self) -> dict[str, Any]:
        """The :class:`~rapidnet.models.rapidnet.RapidNet` constructor arguments this architecture stands for."""
        return dict(
            depths=self.depths,
            widths=self.widths,
            head_dim=self.head_dim,
            num_classes=self.num_classes,
            distillation=self.distillation,
            in_chans=self.in_chans,
            **self.mldc_args,
        )

    @property
    def variant(self) -> str | None:
        """The variant whose depths, widths and head these are (whatever its MLDC settings: see ``describe``)."""
        for name, cfg in VARIANTS.items():
            if (
                tuple(map(tuple, cfg["depths"])) == self.depths
                and tuple(cfg["widths"]) == self.widths
                and (cfg["head_dim"] == self.head_dim)
            ):
                return name
        return None

    def describe(self) -> str:
        name = self.variant
        shape = f"depths {[list(d) for d in self.depths]}, widths {list(self.widths)}, head {self.head_dim}"
        changed = {k: v for k, v in self.mldc_args.items() if v != DEFAULT_MLDC[k]}
        if changed:
            shape += ", " + ", ".join(f"{k} {list(v) if isinstance(v, tuple) else v}" for k, v in changed.items())
        return f"{name} ({shape})" if name else f"a custom RapidNet ({shape})"


_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(\w+)")
_BRANCH_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.mixer\.branches\.(\d+)\.")


def infer_arch(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> ArchSpec:
    """Read depths, widths, head, classes and MLDC settings off a state dict in this project's key names.

    The MLDC branch count, grouping and FFN kernel show in the weights' names and shapes; the dilations do not (a
    3x3 kernel is a 3x3 kernel), so they come from the file's ``mldc_dilations`` metadata, and a file without it is
    the paper's ``(2, 3)`` if it has two branches (every file written before MLDC was a parameter).
    """
    metadata = metadata or {}
    try:
        in_chans = state_dict["stem.0.conv.weight"].shape[1]
        kinds: dict[int, dict[int, str]] = {}
        for key in state_dict:
            if (m := _BLOCK_KEY.match(key)) is not None:
                stage_blocks = kinds.setdefault(int(m.group(1)), {})
                if m.group(3) in ("mixer", "ffn"):
                    stage_blocks[int(m.group(2))] = "dilated"
                else:
                    stage_blocks.setdefault(int(m.group(2)), "inverted_residual")
        num_stages = max(kinds) + 1 if kinds else 0
        widths = [state_dict["stem.1.conv.weight"].shape[0]]
        widths += [state_dict[f"stages.{i}.downsample.conv.weight"].shape[0] for i in range(1, num_stages)]
        depths = []
        for i in range(num_stages):
            found = list(kinds.get(i, {}).values())
            depths.append((found.count("inverted_residual"), found.count("dilated")))
        head_dim = state_dict["head.conv.conv.weight"].shape[0]
        mldc = _infer_mldc(state_dict, kinds, metadata)
    except KeyError as e:
        raise CheckpointError(f"checkpoint lacks {e.args[0]!r}: it is not a RapidNet checkpoint") from None
    except IndexError:  # a conv weight with fewer than 2 dimensions
        raise CheckpointError("checkpoint has a conv weight of too few dimensions: is the file damaged?") from None
    fc = state_dict.get("head.fc.weight")
    return ArchSpec(
        depths=tuple(depths),
        widths=tuple(int(w) for w in widths),
        head_dim=int(head_dim),
        num_classes=int(fc.shape[0]) if fc is not None else 0,
        distillation="head.fc_dist.weight" in state_dict,
        in_chans=int(in_chans),
        reparameterized=not any(k.endswith("running_var") for k in state_dict),
        **mldc,
    )


def _stored_mldc(metadata: Mapping[str, Any], key: str) -> Any:
    value = metadata.get(key, DEFAULT_MLDC[key])
    return tuple(value) if key == "mldc_dilations" else value


def _infer_mldc(
    state_dict: Mapping[str, torch.Tensor], kinds: Mapping[int, Mapping[int, str]], metadata: Mapping[str, Any]
) -> dict[str, Any]:
    """MLDC settings of the first Dilated Convolution block (all blocks share them), checked against the metadata."""
    first = next(((s, b) for s in sorted(kinds) for b in sorted(kinds[s]) if kinds[s][b] == "dilated"), None)
    if first is None:  # no Dilated Convolution block: the settings are moot, keep what the file says
        return {k: _stored_mldc(metadata, k) for k in DEFAULT_MLDC}
    stage, block = first
    prefix = f"stages.{stage}.blocks.{block}."
    branches = mldc_branch_count(state_dict) or 0
    weight = state_dict[f"{prefix}mixer.branches.0.conv.weight"]
    out_chs, per_group = int(weight.shape[0]), int(weight.shape[1])
    # from the branch's own shape (the stage width is checked against every weight later, on meta tensors)
    groups: int | str = out_chs // per_group if per_group and out_chs % per_group == 0 else 1
    if per_group == 1 and out_chs > 1:
        groups = "depthwise"
    if "mldc_groups" in metadata:  # the recorded form: a count equal to one stage's width is not "depthwise"
        stored = metadata["mldc_groups"]
        if (1 if stored == "depthwise" else out_chs / stored) != per_group:
            raise CheckpointError(f"checkpoint metadata says mldc_groups {stored} but its weights have {groups}")
        groups = stored
    dilations = _stored_mldc(metadata, "mldc_dilations")
    if len(dilations) != branches:
        what = f"records mldc_dilations {list(dilations)}" if "mldc_dilations" in metadata else "records no dilations"
        raise CheckpointError(f"checkpoint has {branches} MLDC branches but {what}: re-save it with rapidnet")
    ffn_kernel = int(state_dict[f"{prefix}ffn.dw.conv.weight"].shape[-1])
    return {"mldc_dilations": tuple(dilations), "mldc_groups": groups, "ffn_kernel": ffn_kernel}


def mldc_branch_count(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """Parallel MLDC branches of the first Dilated Convolution block (None: the network has no such block)."""
    found = [m.groups() for k in state_dict if (m := _BRANCH_KEY.match(k))]
    if not found:
        return None
    first = min((int(s), int(b)) for s, b, _ in found)
    return len({i for s, b, i in found if (int(s), int(b)) == first})


def model_arch(model: nn.Module) -> ArchSpec:
    """The same description for a live RapidNet."""
    return ArchSpec(
        depths=tuple(model.depths),
        widths=tuple(model.widths),
        head_dim=model.head_dim,
        num_classes=model.num_classes,
        distillation=model.distillation,
        in_chans=model.in_chans,
        reparameterized=not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()),
        mldc_dilations=tuple(model.mldc_dilations),
        mldc_groups=model.mldc_groups,
        ffn_kernel=model.ffn_kernel,
    )
