"""Draft adapter folders: draft_adapter.json (its shape), draft_adapter.safetensors, and layerskip.json (the
decoding settings it was measured best with, its ranked draft vocabulary included).

A model folder names its own adapter in its layerskip.json (`"draft_adapter": "relative/path"`); the embedded
default's ships in the package (loading/default_model.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from layerskip.errors import LayerSkipError
from layerskip.loading.hf_folder import GENERATION_DEFAULTS_FILE, atomic_folder, read_json
from layerskip.model import ModelConfig
from layerskip.model.draft_adapter import DraftAdapter, DraftAdapterConfig

CONFIG_FILE = "draft_adapter.json"
WEIGHTS_FILE = "draft_adapter.safetensors"
NO_ADAPTER = "none"  # --draft_adapter none: draft from the plain exit even where the model names an adapter


def is_draft_adapter_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def read_draft_adapter(folder: Path, model_config: ModelConfig, *, dtype: torch.dtype,
                       device: torch.device | str) -> DraftAdapter:
    """The adapter of a folder, checked against the model it is attached to; a LayerSkipError names what is wrong."""
    if not is_draft_adapter_folder(folder):
        raise LayerSkipError(f"{folder} is not a draft adapter: it has no {CONFIG_FILE}")
    config = DraftAdapterConfig.from_dict(read_json(folder / CONFIG_FILE), str(folder / CONFIG_FILE))
    config.check_fits(model_config, str(folder))
    adapter = DraftAdapter(config, model_config)
    try:
        state = load_file(folder / WEIGHTS_FILE)
    except (SafetensorError, OSError) as error:
        raise LayerSkipError(f"cannot read the draft adapter's weights {folder / WEIGHTS_FILE}: {error}") from None
    expected = adapter.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise LayerSkipError(f"the weights in {folder / WEIGHTS_FILE} do not match its {CONFIG_FILE}: {detail}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape) or not tensor.is_floating_point():
            raise LayerSkipError(f"the weights in {folder / WEIGHTS_FILE} do not match its {CONFIG_FILE}: tensor "
                                 f"'{name}' has shape {list(tensor.shape)}, expected {list(expected[name].shape)}")
    adapter.load_state_dict({name: tensor.to(dtype) for name, tensor in state.items()})
    return adapter.to(device).eval().requires_grad_(False)


def save_draft_adapter(adapter: DraftAdapter, folder: Path, *, defaults: dict[str, Any] | None = None,
                       dtype: torch.dtype = torch.bfloat16, base_model: str | None = None) -> None:
    """Write an adapter folder atomically (weights in `dtype`: bfloat16 halves the download, drafts do not mind)."""
    with atomic_folder(folder) as staging:
        state = {name: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in adapter.state_dict().items()}
        save_file(state, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        description = {**dataclasses.asdict(adapter.config), **({"base_model": base_model} if base_model else {})}
        (staging / CONFIG_FILE).write_text(json.dumps(description, indent=2) + "\n")
        if defaults:
            (staging / GENERATION_DEFAULTS_FILE).write_text(json.dumps(defaults) + "\n")


def named_draft_adapter(model_folder: Path, defaults: dict[str, Any]) -> Path | None:
    """The adapter a model folder's layerskip.json names, relative to that folder."""
    named = defaults.get("draft_adapter")
    if named is None:
        return None
    if not isinstance(named, str):
        raise LayerSkipError(f"{model_folder / GENERATION_DEFAULTS_FILE}: 'draft_adapter' must be a folder path")
    return (model_folder / named).resolve()
