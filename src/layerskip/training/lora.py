"""LoRA for our decoder, and adapters saved in peft's on-disk format.

An adapter folder holds `adapter_config.json` (peft's LoraConfig fields: r, lora_alpha, target_modules,
base_model_name_or_path, ...) and `adapter_model.safetensors`, whose tensors are named as peft names them
for a Hugging Face LlamaForCausalLM:

    base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.lora_A.weight   [r, in_features]
    base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.lora_B.weight   [out_features, r]

so peft can apply our adapters to transformers models, and we can merge peft's. Merging adds
(lora_alpha / r) * B @ A to the projection's weight (lora_alpha / sqrt(r) with use_rslora).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from layerskip.errors import LayerSkipError
from layerskip.model import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
HF_DECODER_PREFIX = "model."


class LoRALinear(nn.Linear):
    """A linear layer plus a trainable low-rank update: x W^T + b + scaling * B(A(dropout(x))).

    It keeps the wrapped layer's `weight` and `bias` parameters (same names, no copy), so the base
    model's state dict is unchanged; `lora_enabled = False` gives back the base model exactly.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # the update starts at zero: training starts from the base model
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank
        self.lora_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.lora_enabled:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def add_lora(model: Transformer, *, rank: int, alpha: float, dropout: float, targets: Sequence[str]) -> list[str]:
    """Replace the decoder layers' linears named in `targets` by LoRALinear and freeze everything else.

    Returns the wrapped modules' names. A target that names no linear of the layers is an error.
    """
    available = sorted({name.rsplit(".", 1)[-1] for name, module in model.layers[0].named_modules()
                        if isinstance(module, nn.Linear)})
    unknown = [target for target in targets if target not in available]
    if unknown:
        raise LayerSkipError(f"LoRA target module(s) {', '.join(unknown)} do not exist in this model's layers: "
                             f"choose among {', '.join(available)}")
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if name.startswith("layers.") and child in targets and type(module) is nn.Linear:
            setattr(model.get_submodule(parent_name), child, LoRALinear(module, rank, alpha, dropout))
            wrapped.append(name)
    return wrapped


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every LoRA update switched off inside the block (a no-op without LoRA)."""
    modules = [module for module in model.modules() if isinstance(module, LoRALinear)]
    for module in modules:
        module.lora_enabled = False
    try:
        yield
    finally:
        for module in modules:
            module.lora_enabled = True


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def save_adapter(folder: Path, tensors: dict[str, torch.Tensor], *, rank: int, alpha: float, dropout: float,
                 targets: Sequence[str], base_model: str) -> None:
    """Write an adapter folder from LoRA tensors named as in our model (`layers.0.self_attn.q_proj.lora_A.weight`)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
              "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    named = {f"{PEFT_PREFIX}{_hf_name(name)}": tensor.detach().contiguous() for name, tensor in tensors.items()}
    save_file(named, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})


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

    `base` is a Transformer (merged in place; its CPU-packed copies are rebuilt if it had them) or a
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
    parameters = dict(base.named_parameters())
    was_packed = base.packed_head is not None
    base.unpack()
    with torch.no_grad():
        for name, delta in deltas.items():
            _check_fits(adapter_folder, name, parameters.get(name), delta)
            parameters[name].add_(delta.to(parameters[name]))
    if was_packed:
        base.pack_for_cpu_inference()
    return base


def _check_fits(folder: str | Path, name: str, weight: torch.Tensor | None, delta: torch.Tensor) -> None:
    if weight is None or weight.shape != delta.shape:
        found = "no such weight" if weight is None else f"shape {tuple(weight.shape)}"
        raise LayerSkipError(f"adapter {folder} does not fit this model: {name} of shape {tuple(delta.shape)}, "
                             f"the model has {found}")


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"{HF_DECODER_PREFIX}{name}"
