"""LoRA adapters in peft's on-disk format: read them, and merge them into full weights.

An adapter folder holds `adapter_config.json` (peft's LoraConfig fields: r, lora_alpha, target_modules,
base_model_name_or_path, ...) and `adapter_model.safetensors`, whose tensors are named as peft names them
for a Hugging Face LlamaForCausalLM:

    base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.lora_A.weight   [r, in_features]
    base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.lora_B.weight   [out_features, r]

so peft can apply our adapters to transformers models, and we can merge peft's. Merging adds
(lora_alpha / r) * B @ A to the projection's weight (lora_alpha / sqrt(r) with use_rslora).
`layerskip.load` merges an adapter folder into its base model on load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from layerskip.errors import LayerSkipError
from layerskip.model import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
HF_DECODER_PREFIX = "model."


def is_adapter_folder(folder: Path) -> bool:
    """An adapter alone (no config.json of its own): loading it means loading its base model and merging it."""
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def adapter_base_model(folder: Path) -> str:
    """The base model an adapter was trained on, as recorded in its config (a folder, hub id or alias)."""
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise LayerSkipError(f"cannot read {folder / ADAPTER_CONFIG}: {error}") from None
    if not base:
        raise LayerSkipError(f"adapter {folder} does not name its base model (base_model_name_or_path): "
                             "merge it with `layerskip merge-lora --model BASE`")
    return str(base)


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An adapter's config and its tensors renamed to our module names (peft's and our own files)."""
    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise LayerSkipError(f"{folder} is not a LoRA adapter: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(weights_path)
    except (OSError, ValueError, SafetensorError) as error:
        raise LayerSkipError(f"cannot read the adapter in {folder}: {error}") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("fan_in_fan_out"):
        raise LayerSkipError(f"{folder} is not a plain LoRA adapter (DoRA, fan_in_fan_out and other peft types "
                             "are not supported)")
    renamed = {name.removeprefix(PEFT_PREFIX).removeprefix(HF_DECODER_PREFIX): tensor
               for name, tensor in tensors.items()}
    return config, renamed


def adapter_deltas(folder: str | Path) -> dict[str, torch.Tensor]:
    """weight name -> the float32 update scaling * B @ A that the adapter adds to it."""
    config, tensors = read_adapter(folder)
    rank = int(config["r"])
    scaling = float(config["lora_alpha"]) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    deltas = {}
    for name, a in tensors.items():
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0]
            b = tensors.get(f"{module}.lora_B.weight")
            if b is None:
                raise LayerSkipError(f"adapter {folder} has lora_A but no lora_B for {module}")
            deltas[f"{module}.weight"] = scaling * (b.float() @ a.float())
    return deltas


ModelOrState = TypeVar("ModelOrState", Transformer, dict)


def merge_lora(base: ModelOrState, adapter_folder: str | Path) -> ModelOrState:
    """Fold an adapter into full weights: W += scaling * B @ A.

    `base` is a Transformer (merged in place; its weights prepared for a kernel path are prepared again) or a
    state dict with our names or HF names ("model." prefixed), returned as a new dict.
    """
    deltas = adapter_deltas(adapter_folder)
    if isinstance(base, dict):
        merged = dict(base)
        for name, delta in deltas.items():
            key = name if name in base else f"{HF_DECODER_PREFIX}{name}"
            _check_fits(adapter_folder, name, base.get(key), delta)
            merged[key] = (base[key].float() + delta).to(base[key].dtype)
        return merged
    from layerskip.model.kernels.prepare import prepare, unprepare

    parameters = dict(base.named_parameters())
    path, weight_format = base.kernel_path, base.weight_format
    unprepare(base)
    with torch.no_grad():
        for name, delta in deltas.items():
            _check_fits(adapter_folder, name, parameters.get(name), delta)
            parameters[name].add_(delta.to(parameters[name]))
    prepare(base, path, weight_format)
    return base


def _check_fits(folder: str | Path, name: str, weight: torch.Tensor | None, delta: torch.Tensor) -> None:
    if weight is None or weight.shape != delta.shape:
        found = "no such weight" if weight is None else f"shape {tuple(weight.shape)}"
        raise LayerSkipError(f"adapter {folder} does not fit this model: {name} of shape {tuple(delta.shape)}, "
                             f"the model has {found}")


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"{HF_DECODER_PREFIX}{name}"
