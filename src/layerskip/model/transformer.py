"""A compact Llama-family decoder whose layers can be run in ranges, with one shared exit head.

Parameter names follow Hugging Face's LlamaForCausalLM (minus the "model." prefix), so HF state
dicts load without renaming and peft finds the usual target modules.

The three entry points that decoding strategies compose:
  embed(ids) -> hidden;  forward_layers(hidden, start_layer, end_layer, start_pos, cache) -> hidden;
  head(hidden) -> logits  (final norm + LM head, shared by every exit).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from layerskip.model.cache import KVCache
from layerskip.model.config import ModelConfig
from layerskip.model.kernels.linear import PreparedLinear
from layerskip.model.parallel import TensorParallel


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, with linear or Llama 3 frequency scaling applied."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling or {}
    factor = float(scaling.get("factor", 1.0))
    if scaling.get("rope_type") == "linear":
        return inv_freq / factor
    if scaling.get("rope_type") == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, and the band between blended.
        original = float(scaling["original_max_position_embeddings"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        blend = (original / wavelength - low) / (high - low)
        blended = (1 - blend) * scaled / factor + blend * scaled
        in_band = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(in_band, blended, scaled)
    return inv_freq


# Decoding passes run through weights prepared for a kernel path (model/kernels): each module lists its groups
# of linears that read one input (fused into one matrix there), and holds their prepared matrices by name.
# A module without prepared weights, and every pass under autograd (training), uses the nn.Linear weights.
LinearGroups = dict[str, tuple[nn.Linear, ...]]
# (hidden, start_layer, end_layer, start_pos, cache, cos, sin, rows) -> hidden, as forward_layers.
FusedLayers = Callable[[torch.Tensor, int, int, int | torch.Tensor, KVCache | None, torch.Tensor, torch.Tensor,
                        torch.Tensor | None], torch.Tensor]


def run_prepared(prepared: PreparedLinear | None, x: torch.Tensor) -> torch.Tensor | None:
    """The prepared product when it serves this pass, else None (the caller runs its nn.Linear)."""
    return prepared(x) if prepared is not None and prepared.applies(x) else None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        self.prepared: dict[str, PreparedLinear] = {}

    def linear_groups(self) -> LinearGroups:
        return {"qkv": (self.q_proj, self.k_proj, self.v_proj), "o": (self.o_proj,)}

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int | torch.Tensor,
                cache: KVCache | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        if cos.dim() == 3:  # one row of positions per batch row: [B, T, D] -> [B, 1, T, D] over the heads
            cos, sin = cos[:, None], sin[:, None]
        qkv = run_prepared(self.prepared.get("qkv"), x)
        if qkv is not None:
            kv_size = self.num_kv_heads * self.head_dim
            q, k, v = qkv.split([self.num_heads * self.head_dim, kv_size, kv_size], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_index, start_pos, k, v, rows)
        # Grouped-query attention without copying K/V: the query heads that share a KV head are
        # folded into the query-length axis, so one attention call per KV head serves the group.
        group = self.num_heads // self.num_kv_heads
        q = q.reshape(batch, self.num_kv_heads, group * length, self.head_dim)
        mask = None
        key_pos = torch.arange(k.shape[2], device=x.device)
        if isinstance(start_pos, torch.Tensor):  # [B, 1, group * T, S]: each batch row at its own positions
            slots = start_pos if start_pos.dim() == 2 else start_pos[:, None] + torch.arange(length, device=x.device)
            query_pos = slots.repeat(1, group)[:, None, :, None]
            mask = key_pos <= query_pos
        elif length > 1:
            query_pos = torch.arange(start_pos, start_pos + length, device=x.device).repeat(group)[:, None]
            mask = key_pos <= query_pos
        if cache is not None and cache.attendable is not None:
            attendable = (cache.attendable if rows is None else cache.attendable[rows])[:, None, None, :k.shape[2]]
            if mask is None:
                mask = attendable
            else:  # a padding query still sees itself, so its (unused) output is finite, not NaN
                mask = (mask & attendable) | (key_pos == query_pos)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.view(batch, self.num_heads, length, self.head_dim).transpose(1, 2).reshape(batch, length, -1)
        projected = run_prepared(self.prepared.get("o"), out)
        return projected if projected is not None else self.o_proj(out)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.prepared: dict[str, PreparedLinear] = {}

    def linear_groups(self) -> LinearGroups:
        return {"gate_up": (self.gate_proj, self.up_proj), "down": (self.down_proj,)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = run_prepared(self.prepared.get("gate_up"), x)
        if gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        down = run_prepared(self.prepared.get("down"), hidden)
        return down if down is not None else self.down_proj(hidden)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like the reference implementation, then return to the model dtype.
        # Written out: three small ops cost less per decoding step than F.rms_norm's dispatch.
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = FeedForward(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Under tensor parallelism (model/parallel.py) the attention and MLP outputs are this rank's partial sums.
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = lambda partial: partial

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int | torch.Tensor,
                cache: KVCache | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.reduce(self.self_attn(self.input_layernorm(x), cos, sin, start_pos, cache, rows))
        return x + self.reduce(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, parallel: TensorParallel | None = None):
        """`parallel`: this rank's slices under tensor parallelism (`config` is then its layers' local one)."""
        super().__init__()
        self.config = config
        self.parallel = parallel
        start, end = parallel.shard.vocab if parallel is not None else (0, config.vocab_size)
        self.vocab_start = start  # the embedding's and the head's rows are token ids [start, end)
        self.embed_tokens = nn.Embedding(end - start, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        if parallel is not None:
            for layer in self.layers:
                layer.reduce = parallel.all_reduce
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, end - start, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.prepared: dict[str, PreparedLinear] = {}   # the head, prepared for a kernel path (model/kernels)
        self.kernel_path = "plain"                         # which path the prepared weights are for
        self.weight_format = "float32"                     # and in which format they are
        # All layers of a pass in one call of the native kernels (passes without autograd; see forward_layers).
        self.fused_layers: FusedLayers | None = None
        # Short passes as compiled static-shape graphs (model/static.py: CompiledSteps), when --compile kept them.
        self.compiled_steps: Any = None
        # Token ids ranked by how often the model produces them (stored with the model, see draft_head).
        self.draft_vocab: torch.Tensor | None = None
        self._draft_heads: dict[int, tuple[torch.Tensor, torch.Tensor, PreparedLinear | None]] = {}

    def linear_groups(self) -> LinearGroups:
        return {"head": (self.lm_head,)}

    def prepared_modules(self) -> list[nn.Module]:
        """Every module whose linears a kernel path prepares (see model/kernels/prepare.py)."""
        return [module for layer in self.layers for module in (layer.self_attn, layer.mlp)] + [self]

    @property
    def row_invariant(self) -> bool:
        """Whether a position's logits are bit-identical whatever else shares its pass: the native kernels run
        every layer (attention included) and the head."""
        return self.fused_layers is not None and all(p.row_invariant for p in self.prepared.values())

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def kv_cache(self, capacity: int, batch_size: int = 1) -> KVCache:
        """A cache for decoding: the compiled passes' own (kept across calls, see model/static.py), else a new one
        of the weights' dtype and device."""
        if self.compiled_steps is not None:
            return self.compiled_steps.kv_cache(capacity, batch_size)
        weight = self.embed_tokens.weight
        return KVCache(self.config, capacity, batch_size=batch_size, dtype=weight.dtype, device=weight.device)

    def rope(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions [start, start + length), from a float32 table grown on demand."""
        end = start + length
        table = self._rope_table
        if table is None or table[0].shape[0] < end or table[0].dtype != dtype or table[0].device != self.inv_freq.device:
            size = max(end, 2 * (table[0].shape[0] if table is not None else 256))
            positions = torch.arange(size, device=self.inv_freq.device, dtype=torch.float32)
            angles = torch.outer(positions, self.inv_freq.float())
            angles = torch.cat((angles, angles), dim=-1)
            table = self._rope_table = (angles.cos().to(dtype), angles.sin().to(dtype))
        return table[0][start:end], table[1][start:end]

    def rope_at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at each of `positions` ([T], or [B, T] per batch row): tree drafts' rows share a position."""
        cos, sin = self.rope(0, int(positions.max()) + 1, dtype)
        return cos[positions], sin[positions]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel is not None:
            return self.parallel.embed(self.embed_tokens.weight, token_ids)
        return self.embed_tokens(token_ids)

    def whole_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over this model's head rows as the whole vocabulary's (gathered from every rank under TP)."""
        return self.parallel.gather_vocab(logits) if self.parallel is not None else logits

    def forward_layers(self, hidden: torch.Tensor, start_layer: int, end_layer: int,
                       start_pos: int | torch.Tensor = 0, cache: KVCache | None = None,
                       positions: list[int] | torch.Tensor | None = None,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run layers [start_layer, end_layer) over cache slots [start_pos, start_pos + T), writing their KV.

        `start_pos` as an int64 tensor [B] puts each batch row at its own slots (a batch of sequences of different
        lengths; needs `cache`), and `rows` [B] names each batch row's row of the cache (a pass over some of the
        sequences a cache holds). A row's position is its slot, unless `positions` gives each row's own (for RoPE;
        a list for the pass's rows, or a tensor [B, T] per batch row): tree drafts put the candidates for one
        position in consecutive slots, masked from each other through `cache.attendable`. `start_pos` as a tensor
        [B, T] gives every row's slot: the static-shape path of compiled passes (model/static.py), through the
        modules, the cache read whole under a mask.
        """
        if self.compiled_steps is not None and self.compiled_steps.applies(hidden, cache):
            return self.compiled_steps(hidden, start_layer, end_layer, start_pos, cache, positions, rows)
        if positions is not None:
            cos, sin = self.rope_at(torch.as_tensor(positions, device=self.inv_freq.device), hidden.dtype)
        elif isinstance(start_pos, torch.Tensor):
            slots = start_pos if start_pos.dim() == 2 else \
                start_pos[:, None] + torch.arange(hidden.shape[1], device=start_pos.device)
            cos, sin = self.rope_at(slots, hidden.dtype)
        else:
            cos, sin = self.rope(start_pos, hidden.shape[1], hidden.dtype)
        static = isinstance(start_pos, torch.Tensor) and start_pos.dim() == 2  # slots [B, T]: the modules' path
        if self.fused_layers is not None and not torch.is_grad_enabled() and not static:
            return self.fused_layers(hidden, start_layer, end_layer, start_pos, cache, cos, sin, rows)
        for layer in self.layers[start_layer:end_layer]:
            hidden = layer(hidden, cos, sin, start_pos, cache, rows)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The one exit head shared by every layer: final norm, then the LM head; float32 logits."""
        normed = self.norm(hidden)
        logits = run_prepared(self.prepared.get("head"), normed)
        return self.whole_vocab((logits if logits is not None else self.lm_head(normed)).float())

    def set_draft_vocab(self, token_ids: list[int] | None) -> None:
        """Token ids ranked by how often the model produces them, most frequent first (see draft_head)."""
        bad = [i for i in token_ids or [] if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"draft vocabulary id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        self.draft_vocab = None if token_ids is None else torch.tensor(token_ids, dtype=torch.long)
        self._draft_heads.clear()

    def draft_head(self, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """The shared head scoring only the `vocab_size` first tokens of `draft_vocab`: float32 logits over the
        whole vocabulary, -inf for the tokens left out.

        For drafts only. The tied head of a small model is a large part of a draft step (SmolLM2-135M: 28M of
        the 134M parameters), and most of the tokens a model produces come from a few thousand ids. A draft
        can then never propose a token outside the slice, but verification scores the full vocabulary, so
        outputs are unchanged (greedy) or identically distributed (sampling: q is zero outside the slice).
        """
        stored = 0 if self.draft_vocab is None else len(self.draft_vocab)
        if not 0 < vocab_size <= stored:
            raise ValueError(f"draft vocabulary size {vocab_size} is not in [1, {stored}]")
        sliced = self._draft_heads.get(vocab_size)
        if sliced is None:  # the slice's rows of this model's head (all of them, unless the vocabulary is sharded)
            ids = self.draft_vocab[:vocab_size].to(self.lm_head.weight.device) - self.vocab_start
            ids = ids[(ids >= 0) & (ids < self.lm_head.out_features)]
            weight = self.lm_head.weight.detach()[ids]
            head = self.prepared.get("head")
            sliced = self._draft_heads[vocab_size] = (ids, weight, head.rows(ids, weight) if head and len(ids) else None)
        ids, weight, prepared = sliced
        full = hidden.new_full((*hidden.shape[:-1], self.lm_head.out_features), float("-inf"), dtype=torch.float32)
        if len(ids):
            normed = self.norm(hidden)
            logits = run_prepared(prepared, normed)
            logits = logits if logits is not None else F.linear(normed, weight)
            full.index_copy_(-1, ids, logits.float())
        return self.whole_vocab(full)

    def forward(self, token_ids: torch.Tensor, *, exit_layer: int | None = None, start_pos: int | torch.Tensor = 0,
                cache: KVCache | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every position, exiting after `exit_layer` layers (all layers when None)."""
        end = self.num_layers if exit_layer is None else exit_layer
        return self.head(self.forward_layers(self.embed(token_ids), 0, end, start_pos, cache, rows=rows))
