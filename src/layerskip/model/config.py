"""Model hyperparameters, read from a Hugging Face `config.json` (transformers 4.x and 5.x layouts)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from layerskip.errors import LayerSkipError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
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
    def from_hf_dict(cls, raw: Any, source: str = "config.json") -> "ModelConfig":
        """Validate an HF config dict and keep what the Llama family needs; refuse anything else.

        Every problem is a LayerSkipError naming `source` (the file) and the key: a missing required key, a
        value of the wrong type, a size that is not positive, heads that do not divide the hidden size."""
        if not isinstance(raw, dict):
            raise LayerSkipError(f"{source} is not a JSON object")
        model_type = raw.get("model_type", "llama")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES \
                or any(k in raw for k in ("num_local_experts", "num_experts")):
            raise LayerSkipError(f"unsupported architecture '{model_type}': layerskip supports {SUPPORTED_DESCRIPTION}")
        if raw.get("hidden_act", "silu") != "silu":
            raise LayerSkipError(f"unsupported activation '{raw['hidden_act']}': layerskip supports {SUPPORTED_DESCRIPTION}")
        missing = [name for name in REQUIRED_KEYS if raw.get(name) is None]
        if missing:
            plural = len(missing) > 1
            raise LayerSkipError(f"{source}: required key{'s' if plural else ''} "
                                 f"{', '.join(repr(name) for name in missing)} {'are' if plural else 'is'} missing")
        key = _Keys(raw, source)
        max_positions = key.size("max_position_embeddings", 2048)
        sliding_window = key.size("sliding_window", None) if key.flag("use_sliding_window", True) else None
        if sliding_window:
            # Within the window, sliding-window attention is plain causal attention: cap the context there.
            max_positions = min(max_positions, sliding_window)
        # transformers 5 folds rope_theta and rope_scaling into one rope_parameters dict.
        rope_key = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
        rope = raw.get(rope_key) or {}
        if not isinstance(rope, dict):
            raise LayerSkipError(f"{source}: key '{rope_key}' must be an object, got {_shown(rope)}")
        rope = dict(rope)
        rope_theta = _Keys(rope, source, rope_key).number("rope_theta") if "rope_theta" in rope \
            else key.number("rope_theta", 10000.0)
        rope.pop("rope_theta", None)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
            raise LayerSkipError(f"unsupported rope type '{rope_type}': layerskip supports {SUPPORTED_DESCRIPTION}")
        scaling_keys = _Keys(rope, source, rope_key)
        if rope_type in ("linear", "llama3"):
            scaling_keys.number("factor")
        if rope_type == "llama3":
            low, high = scaling_keys.number("low_freq_factor"), scaling_keys.number("high_freq_factor")
            scaling_keys.number("original_max_position_embeddings")
            if low >= high:
                raise LayerSkipError(f"{source}: key '{rope_key}': low_freq_factor {low:g} must be below "
                                     f"high_freq_factor {high:g}")
        hidden = key.size("hidden_size")
        heads = key.size("num_attention_heads")
        kv_heads = key.size("num_key_value_heads", None) or heads
        head_dim = key.size("head_dim", None)
        if head_dim is None:  # Llama derives it; an explicit head_dim need not divide the hidden size
            if hidden % heads:
                raise LayerSkipError(f"{source}: num_attention_heads {heads} does not divide hidden_size {hidden} "
                                     "(and there is no head_dim)")
            head_dim = hidden // heads
        if head_dim % 2:
            raise LayerSkipError(f"{source}: head_dim {head_dim} is odd, and rotary embeddings rotate pairs")
        if heads % kv_heads:
            raise LayerSkipError(f"{source}: num_key_value_heads {kv_heads} does not divide "
                                 f"num_attention_heads {heads}")
        return cls(
            vocab_size=key.size("vocab_size"),
            hidden_size=hidden,
            intermediate_size=key.size("intermediate_size"),
            num_hidden_layers=key.size("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=key.number("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            max_position_embeddings=max_positions,
            tie_word_embeddings=key.flag("tie_word_embeddings", False),
            attention_bias=key.flag("attention_bias", False),
            mlp_bias=key.flag("mlp_bias", False),
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


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, bool, type(None))) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_REQUIRED = object()


class _Keys:
    """Typed reads of a config dict's keys; a bad value is a LayerSkipError naming the file and the key."""

    def __init__(self, raw: dict[str, Any], source: str, section: str | None = None):
        self.raw, self.source, self.section = raw, source, section

    def _name(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    def _get(self, name: str, default: Any) -> Any:
        value = self.raw.get(name)
        if value is None:  # absent, or null (which HF writes for "unset")
            if default is _REQUIRED:
                raise LayerSkipError(f"{self.source}: required key '{self._name(name)}' is missing")
            return default
        return value

    def size(self, name: str, default: Any = _REQUIRED) -> Any:
        """A positive integer (integral floats such as 64.0 accepted)."""
        value = self._get(name, default)
        if value is default:
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise LayerSkipError(f"{self.source}: key '{self._name(name)}' must be an integer, got {_shown(value)}")
        if not 1 <= value < 2 ** 31:
            raise LayerSkipError(f"{self.source}: key '{self._name(name)}' must be "
                                 f"{'positive' if value < 1 else 'below 2**31'}, got {value}")
        return value

    def number(self, name: str, default: Any = _REQUIRED) -> Any:
        """A positive finite number."""
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LayerSkipError(f"{self.source}: key '{self._name(name)}' must be a number, got {_shown(value)}")
        if not 0 < value < math.inf:
            raise LayerSkipError(f"{self.source}: key '{self._name(name)}' must be a positive finite number, "
                                 f"got {value}")
        return float(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise LayerSkipError(f"{self.source}: key '{self._name(name)}' must be true or false, got {_shown(value)}")
        return value
