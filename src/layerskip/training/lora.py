"""LoRA for our decoder during training, and adapters saved in peft's on-disk format (layerskip.loading.adapter
reads and merges them)."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from layerskip.errors import LayerSkipError
from layerskip.loading.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, hf_name
from layerskip.model import Transformer


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


def store_frozen_weights_as(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep the frozen base weights of the LoRA layers in `dtype`.

    Under autocast to `dtype` they are cast at every call anyway (autocast caches casts of trainable weights
    only), so storing them cast gives the same numbers without a cast per forward, in half the memory.
    """
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)


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
    named = {f"{PEFT_PREFIX}{hf_name(name)}": tensor.detach().contiguous() for name, tensor in tensors.items()}
    save_file(named, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
