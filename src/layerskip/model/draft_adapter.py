"""Draft adapters: a small trained module between the exit layer's states and the shared head, for drafts only.

Self-speculation drafts from the states leaving layer E-1. A model not trained for early exit drafts badly
from there; a draft adapter, trained with the model frozen (training/draft_adapter.py), maps those states
to ones the shared final norm and LM head read as the model's next token. Verification still reads the
unadapted exit states, so the output is exactly the base model's, greedy and sampled.

One adapter is, in order:
  - with `context`: a projection of [exit state; the final layer's state of the previous position] back to
    the hidden size. That state comes free with every verification (EAGLE's insight); past the first draft
    of a round it is the adapter's own output at the previous position, the only prediction of it there is;
  - `kind: layer`, one decoder layer of the model's shape with its own one-layer KV cache, rolled back by
    position like the model's; or `kind: mlp`, one residual SwiGLU block that sees its position only.

At initialisation the adapter is the identity on the exit state (the context half of the projection and the
blocks' output projections are zero), so training starts from plain early-exit drafts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from layerskip.errors import LayerSkipError
from layerskip.model.cache import KVCache
from layerskip.model.config import ModelConfig
from layerskip.model.kernels.linear import PreparedLinear
from layerskip.model.transformer import DecoderLayer, FeedForward, FusedLayers, LinearGroups, RMSNorm, run_prepared

ADAPTER_KINDS = ("layer", "mlp")


@dataclasses.dataclass(frozen=True)
class DraftAdapterConfig:
    exit_layer: int                    # E: the adapter reads the states leaving layer E-1
    hidden_size: int                   # the base model's, checked when the adapter is attached
    kind: str = "layer"                # layer | mlp
    intermediate_size: int = 1536      # of its SwiGLU block
    context: bool = True               # also read the final layer's state of the previous position

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> "DraftAdapterConfig":
        """Validated, or a LayerSkipError naming `source` and the key."""
        if not isinstance(raw, dict):
            raise LayerSkipError(f"{source} is not a JSON object")
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names - {"base_model"})  # base_model: which model it was trained on, for people
        if unknown:
            raise LayerSkipError(f"{source}: unknown key '{unknown[0]}'")
        for key in ("exit_layer", "hidden_size", "intermediate_size"):
            if key == "intermediate_size" and key not in raw:
                continue  # the dataclass default
            value = raw.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayerSkipError(f"{source}: '{key}' must be a positive integer, got {value!r:.40}")
        if raw.get("kind", "layer") not in ADAPTER_KINDS:
            raise LayerSkipError(f"{source}: 'kind' must be one of {', '.join(ADAPTER_KINDS)}, got {raw['kind']!r:.40}")
        if not isinstance(raw.get("context", True), bool):
            raise LayerSkipError(f"{source}: 'context' must be true or false")
        return cls(**{key: value for key, value in raw.items() if key in names})

    def check_fits(self, model: ModelConfig, source: str) -> None:
        if self.hidden_size != model.hidden_size:
            raise LayerSkipError(f"draft adapter {source} is for hidden size {self.hidden_size}, but the model's is "
                                 f"{model.hidden_size}: it belongs to another model")
        if not 1 <= self.exit_layer < model.num_hidden_layers:
            raise LayerSkipError(f"draft adapter {source} reads exit layer {self.exit_layer}, outside [1, "
                                 f"{model.num_hidden_layers - 1}] for this {model.num_hidden_layers}-layer model")


class DraftAdapter(nn.Module):
    def __init__(self, config: DraftAdapterConfig, model_config: ModelConfig):
        super().__init__()
        self.config = config
        size, eps = model_config.hidden_size, model_config.rms_norm_eps
        self.layer_config = dataclasses.replace(model_config, intermediate_size=config.intermediate_size,
                                                num_hidden_layers=1)
        self.context_norm = RMSNorm(size, eps) if config.context else None
        self.fuse = nn.Linear(2 * size, size, bias=False) if config.context else None
        self.layer = DecoderLayer(self.layer_config, 0) if config.kind == "layer" else None
        self.mlp_norm = RMSNorm(size, eps) if config.kind == "mlp" else None
        self.mlp = FeedForward(self.layer_config) if config.kind == "mlp" else None
        self.prepared: dict[str, PreparedLinear] = {}
        # Its decoder layer in one call of the native kernels (passes without autograd), as Transformer.fused_layers.
        self.fused_layer: FusedLayers | None = None
        self.reset_to_identity()

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Zero the residual branches' outputs and the context half of the projection: drafts are plain exits."""
        if self.fuse is not None:
            size = self.config.hidden_size
            self.fuse.weight.zero_()
            self.fuse.weight[:, :size].copy_(torch.eye(size))
        outputs = (self.layer.self_attn.o_proj, self.layer.mlp.down_proj) if self.layer is not None \
            else (self.mlp.down_proj,)
        for linear in outputs:
            linear.weight.zero_()

    @property
    def has_cache(self) -> bool:
        """Whether it attends over earlier positions (and so keeps a KV cache of its own)."""
        return self.layer is not None

    def linear_groups(self) -> LinearGroups:
        return {"fuse": (self.fuse,)} if self.fuse is not None else {}

    def prepared_modules(self) -> list[nn.Module]:
        """The modules whose linears a kernel path prepares (see model/kernels/prepare.py)."""
        inner = [self.layer.self_attn, self.layer.mlp] if self.layer is not None else [self.mlp]
        return inner + [self]

    def kv_cache(self, capacity: int, *, batch_size: int = 1) -> KVCache | None:
        if self.layer is None:
            return None
        weight = self.layer.input_layernorm.weight
        return KVCache(self.layer_config, capacity, batch_size=batch_size, dtype=weight.dtype, device=weight.device)

    def forward(self, exit_hidden: torch.Tensor, context: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                start_pos: int | torch.Tensor = 0, cache: KVCache | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """States for the shared head at positions [start_pos, start_pos + T), from the exit states there and (with
        `context`) the final layer's states of the positions one before; cos/sin: the model's RoPE there. A batch
        of sequences passes per-row `start_pos` and the `rows` of its cache, as Transformer.forward_layers."""
        x = exit_hidden
        if self.fuse is not None:
            if context is None:
                raise ValueError("this draft adapter reads the previous position's final state: pass context")
            joined = torch.cat((exit_hidden, self.context_norm(context)), dim=-1)
            fused = run_prepared(self.prepared.get("fuse"), joined)
            x = fused if fused is not None else self.fuse(joined)
        if self.fused_layer is not None and not torch.is_grad_enabled():
            return self.fused_layer(x, 0, 1, start_pos, cache, cos, sin, rows)
        if self.layer is not None:
            return self.layer(x, cos, sin, start_pos, cache, rows)
        return x + self.mlp(self.mlp_norm(x))


def previous_positions(finals: torch.Tensor) -> torch.Tensor:
    """Each position's context over a whole sequence [B, T, H] (training, teacher-forced analysis): the final
    state one position before, zeros at the first."""
    return torch.cat((torch.zeros_like(finals[:, :1]), finals[:, :-1]), dim=1)
