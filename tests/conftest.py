"""Shared fixtures: tiny random checkpoints written with transformers, and the embedded default model."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

warnings.filterwarnings("ignore", category=UserWarning)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_CONFIG: dict[str, Any] = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)


def make_hf_model(**overrides: Any) -> Any:
    """A random transformers LlamaForCausalLM; weights scaled up so logits are far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(overrides.pop("seed", 0))
    config = LlamaConfig(**{**TINY_CONFIG, **overrides})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0.0, 0.15)
    return model


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Callable[..., tuple[Path, Any]]:
    """Factory: write a tiny HF checkpoint folder (no tokenizer); returns (folder, hf_model)."""

    def write(name: str = "tiny", **overrides: Any) -> tuple[Path, Any]:
        model = make_hf_model(**overrides)
        folder = tmp_path / name
        model.save_pretrained(folder)
        return folder, model

    return write


@pytest.fixture(scope="session")
def default_model() -> Any:
    import layerskip

    return layerskip.load()
