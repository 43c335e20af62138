"""Model hyperparameters, read from a Hugging Face `config.json` (transformers 4.x and 5.x layouts)."""

from __future__ import annotations

import dataclasses
from typing import Any

from layerskip.errors import LayerSkipError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
SUPPORTED_DESCRIPTION = (
    "Llama-family decoders (Llama 2/3/3.1/3.2, Code Llama, TinyLlama, SmolLM/SmolLM2, "
    "Mistral without sliding window) with rope types default, linear and llama3"
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    model_type: str = "llama"

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Validate an HF config dict and keep what the Llama family needs; refuse anything else."""
        model_type = raw.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES or any(k in raw for k in ("num_local_experts", "num_experts")):
            raise LayerSkipError(f"unsupported architecture '{model_type}': layerskip supports {SUPPORTED_DESCRIPTION}")
        if raw.get("hidden_act", "silu") != "silu":
            raise LayerSkipError(f"unsupported activation '{raw['hidden_act']}': layerskip supports {SUPPORTED_DESCRIPTION}")
        max_positions = int(raw.get("max_position_embeddings", 2048))
        sliding_window = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
        if sliding_window:
            # Within the window, sliding-window attention is plain causal attention: cap the context there.
            max_positions = min(max_positions, int(sliding_window))
        # transformers 5 folds rope_theta and rope_scaling into one rope_parameters dict.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise LayerSkipError(f"unsupported rope type '{rope_type}': layerskip supports {SUPPORTED_DESCRIPTION}")
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            model_type=model_type,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that transformers (4.x and 5.x) reads back as an equivalent LlamaConfig."""
        out = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model_type",)},
        }
        if self.rope_scaling is None:
            out.pop("rope_scaling")
        return out
