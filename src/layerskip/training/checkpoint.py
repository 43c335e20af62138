"""Checkpoints: Hugging Face folders that `layerskip generate` loads, plus what exact resumption needs.

    <output_dir>/checkpoints/step_0000500/
        model.safetensors, config.json, tokenizer files ...   full finetuning: a complete HF checkpoint
        adapter_config.json, adapter_model.safetensors        LoRA: the adapter (see lora.py)
        training_state.pt    optimizer, scheduler, curriculum, data position, RNG states of every rank
        recipe.yaml          the resolved recipe

A checkpoint is built in a hidden sibling folder and renamed into place, so a folder named step_* is
always complete. training_state.pt holds only tensors and plain values: it is read with
torch.load(weights_only=True), never unpickled.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerskip.loading.adapter import merge_lora
from layerskip.loading.hf_folder import atomic_folder, load_state_dict, read_config, save_hf_weights

TRAINING_STATE = "training_state.pt"
RECIPE = "recipe.yaml"
STEP_FOLDER = re.compile(r"^step_(\d+)$")
# Files of a model folder that are weights (written anew) rather than config/tokenizer files (copied).
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pth|pt|gguf)$|.*\.safetensors\.index\.json$")


def step_folder(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_FOLDER.match(p.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: Path, keep: int) -> None:
    for path in checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def copy_model_files(source: Path, destination: Path) -> None:
    """config.json, tokenizer, chat template, generation config, licence...: every top-level non-weight file."""
    for path in source.iterdir():
        if path.is_file() and not WEIGHT_FILE.match(path.name):
            shutil.copy2(path, destination / path.name)


def rng_state() -> dict[str, Any]:
    """This process's random states (python, numpy, torch CPU and CUDA), as tensors and plain values."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                                           "pos": int(numpy_state["state"]["pos"])}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state({**numpy_state, "state": {"key": numpy_state["state"]["key"].numpy().astype(np.uint32),
                                                  "pos": numpy_state["state"]["pos"]}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_training_state(folder: Path, state: dict[str, Any]) -> None:
    torch.save(state, folder / TRAINING_STATE)


def load_training_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / TRAINING_STATE, weights_only=True, map_location="cpu")


def write_merged_checkpoint(base_folder: Path, adapter_folder: Path, target: Path) -> None:
    """A complete HF checkpoint at `target`: the base model's weights with the adapter merged, its config and tokenizer."""
    tied = read_config(base_folder).tie_word_embeddings
    merged = merge_lora(load_state_dict(base_folder), adapter_folder)
    with atomic_folder(target) as staging:
        copy_model_files(base_folder, staging)
        save_hf_weights(staging, merged, tied=tied)
