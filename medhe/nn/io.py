"""Saved model directories: weights in safetensors, everything else in JSON. Never pickle.

A model directory holds:
  model.json          format version, architecture, layer list, preprocessing, class names,
                      dataset and split version, metrics
  weights.safetensors the state dict (float32 tensors)
The layer list is what the compiler traces, so the compiler needs neither torch nor this module;
`medhe.nn.modeldir` finds and reads model directories without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medhe.data.preprocess import Preprocessing
from medhe.errors import ModelFormatError, UnsupportedLayerError
from medhe.nn.layers import PolyAct
from medhe.nn.model import HECNN, ArchConfig
from medhe.nn.modeldir import (ENSEMBLE_FORMAT, ENSEMBLE_FORMAT_VERSION, ENSEMBLE_JSON,  # noqa: F401
                               MODEL_FORMAT, MODEL_FORMAT_VERSION, MODEL_JSON, SHIPPED_MODELS, WEIGHTS_FILE,
                               check_ensemble_agreement, ensemble_members, read_model_json, resolve_model_dir,
                               shipped_models_dir)

SUPPORTED_LAYERS = ("Conv2d", "AvgPool2d", "BatchNorm2d", "BatchNorm1d", "PolyAct", "ReLU", "Flatten", "Linear")


@dataclass
class ModelCard:
    """Everything about a model except its weights."""

    arch: ArchConfig
    preprocessing: Preprocessing
    class_names: list[str]
    dataset: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def describe_layers(model: nn.Sequential) -> list[dict]:
    """The layer list of a torch Sequential, with state-dict keys of each layer's tensors."""
    described = []
    for index, layer in enumerate(model):
        prefix = f"layers.{index}."
        kind = type(layer).__name__
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros":
                raise UnsupportedLayerError(
                    f"layer {index}: Conv2d with groups/dilation/non-zero padding is not supported"
                )
            described.append({
                "type": "conv2d", "in_channels": layer.in_channels, "out_channels": layer.out_channels,
                "kernel_size": list(layer.kernel_size), "stride": list(layer.stride),
                "padding": list(layer.padding), "weight": prefix + "weight",
                "bias": prefix + "bias" if layer.bias is not None else None,
            })
        elif isinstance(layer, nn.AvgPool2d):
            kernel = layer.kernel_size if isinstance(layer.kernel_size, int) else layer.kernel_size[0]
            stride = layer.stride if isinstance(layer.stride, int) else layer.stride[0]
            if layer.padding not in (0, (0, 0)) or layer.ceil_mode:
                raise UnsupportedLayerError(f"layer {index}: AvgPool2d with padding/ceil_mode is not supported")
            described.append({"type": "avgpool2d", "kernel_size": kernel, "stride": stride})
        elif isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm1d)):
            described.append({
                "type": "batchnorm", "eps": layer.eps, "weight": prefix + "weight", "bias": prefix + "bias",
                "running_mean": prefix + "running_mean", "running_var": prefix + "running_var",
            })
        elif isinstance(layer, PolyAct):
            described.append({"type": "poly", "coef": prefix + "coef"})
        elif isinstance(layer, nn.ReLU):
            described.append({"type": "relu"})
        elif isinstance(layer, nn.Flatten):
            described.append({"type": "flatten"})
        elif isinstance(layer, nn.Linear):
            described.append({
                "type": "linear", "in_features": layer.in_features, "out_features": layer.out_features,
                "weight": prefix + "weight", "bias": prefix + "bias" if layer.bias is not None else None,
            })
        else:
            raise UnsupportedLayerError(
                f"layer {index} is {kind}; supported layers: {', '.join(SUPPORTED_LAYERS)}"
            )
    return described


def save_model(directory: str | Path, model: HECNN, card: ModelCard) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    save_file(state, str(directory / WEIGHTS_FILE))
    doc = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "arch": card.arch.to_dict(),
        "layers": describe_layers(model.layers),
        "input_shape": [card.arch.in_channels, card.arch.image_size, card.arch.image_size],
        "preprocessing": card.preprocessing.to_dict(),
        "class_names": list(card.class_names),
        "dataset": card.dataset,
        "metrics": card.metrics,
    }
    (directory / MODEL_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True))
    return directory


def save_ensemble(directory: str | Path, member_dirs: list[str | Path]) -> Path:
    """An ensemble directory: copies of the member model directories (member-1, member-2, ...) and
    an ensemble.json naming them. Its plan averages the members' logits (medhe.compiler.compile_ensemble)."""
    import shutil

    directory, member_dirs = Path(directory), [Path(d) for d in member_dirs]
    if len(member_dirs) < 2:
        raise ModelFormatError(f"an ensemble needs at least two models, got {len(member_dirs)}")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ModelFormatError(f"{directory} exists and is not an empty directory; choose a new directory for "
                               "the ensemble")
    check_ensemble_agreement(member_dirs, [read_model_json(d) for d in member_dirs])
    names = [f"member-{number}" for number in range(1, len(member_dirs) + 1)]
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        for name, member in zip(names, member_dirs):
            shutil.copytree(member, directory / name)
        doc = {"format": ENSEMBLE_FORMAT, "format_version": ENSEMBLE_FORMAT_VERSION, "members": names,
               "combine": "mean of the members' logits"}
        (directory / ENSEMBLE_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True))
        ensemble_members(directory)  # what was written reads back
    except BaseException:  # no half-written ensemble left behind
        for name in names:
            shutil.rmtree(directory / name, ignore_errors=True)
        (directory / ENSEMBLE_JSON).unlink(missing_ok=True)
        if created:
            directory.rmdir()
        raise
    return directory


class MeanOfModels(nn.Module):
    """An ensemble's plaintext model: the mean of its members' logits (what its plan computes)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


def load_model(directory: str | Path) -> tuple[nn.Module, ModelCard]:
    """Rebuild the torch model (eval mode) and its card from a model directory. An ensemble
    directory gives `MeanOfModels` and its first member's card (the members share preprocessing,
    classes and data set: `ensemble_members` checks), its metrics naming the members."""
    directory = Path(directory)
    members = ensemble_members(directory)
    if members is not None:
        loaded = [_load_single(member) for member in members]
        card = loaded[0][1]
        card = ModelCard(card.arch, card.preprocessing, card.class_names, card.dataset,
                         {"members": [str(m) for m in members]})
        return MeanOfModels([model for model, _ in loaded]).eval(), card
    return _load_single(directory)


def _load_single(directory: Path) -> tuple[HECNN, ModelCard]:
    doc = read_model_json(directory)
    arch = ArchConfig.from_dict(doc["arch"])
    card = ModelCard(
        arch=arch,
        preprocessing=Preprocessing.from_dict(doc["preprocessing"]),
        class_names=list(doc["class_names"]),
        dataset=doc.get("dataset", {}),
        metrics=doc.get("metrics", {}),
    )
    model = HECNN(arch)
    state = load_file(str(directory / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ModelFormatError(
            f"{directory / WEIGHTS_FILE} does not match the architecture: missing {missing}, "
            f"unexpected {unexpected}"
        )
    model.eval()
    return model, card
