"""A compact Llama-family decoder whose layers can be run in ranges, with one shared exit head.

Parameter names follow Hugging Face's LlamaForCausalLM (minus the "model." prefix), so HF state
dicts load without renaming and peft finds the usual target modules.

The three entry points that decoding strategies compose:
  embed(ids) -> hidden;  forward_layers(hidden, start_layer, end_layer, start_pos, cache) -> hidden;
  head(hidden) -> logits  (final norm + LM head, shared by every exit).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from layerskip.model.cache import KVCache
from layerskip.model.config import ModelConfig


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


# ---- CPU decoding fast path -------------------------------------------------------------------------
# Decoding multiplies a few activation rows (1 per step, k+1 per verification) by every weight matrix.
# MKL's default path streams the weights at about 10 GB/s on our 2-core machine; oneDNN's prepacked path
# is 25-45% faster for 1 to 32 rows, more so with the q/k/v and gate/up matrices fused into one
# (docs/BENCHMARKS.md). Longer passes (prompt prefill) stay on the default path, which is bit-identical
# to transformers; the packed path sums in another order (logits differ by ~1e-4). Packed copies cost
# the weights' memory again; training always uses the plain weights. Which path is faster depends on the
# CPU (on a later host MKL's single-row path streamed at 21 GB/s, the packed one at 15), so loading times
# both on the model's own weights and keeps the faster (`packing_pays`).

PACKED_MAX_ROWS = 32
PackedWeight = tuple[torch.Tensor, torch.Tensor | None]


def pack_linears(*linears: nn.Linear) -> PackedWeight:
    """One oneDNN-prepacked matrix for several linears that read the same input (outputs concatenated)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
    return pack_weight(weight), bias


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def packed_applies(packed: PackedWeight | None, x: torch.Tensor) -> bool:
    return packed is not None and x.numel() <= PACKED_MAX_ROWS * x.shape[-1] and not torch.is_grad_enabled()


def packed_linear(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed[0], packed[1], "none", [], "")


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
        self.packed_qkv: PackedWeight | None = None
        self.packed_o: PackedWeight | None = None

    def linear_groups(self) -> list[tuple[tuple[nn.Linear, ...], PackedWeight | None]]:
        """The linears the packed path fuses (each group reads one input), with their packed weights."""
        return [((self.q_proj, self.k_proj, self.v_proj), self.packed_qkv), ((self.o_proj,), self.packed_o)]

    def pack(self) -> None:
        self.packed_qkv, self.packed_o = (pack_linears(*group) for group, _ in self.linear_groups())

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int,
                cache: KVCache | None) -> torch.Tensor:
        batch, length, _ = x.shape
        if packed_applies(self.packed_qkv, x):
            kv_size = self.num_kv_heads * self.head_dim
            q, k, v = packed_linear(x, self.packed_qkv).split([self.num_heads * self.head_dim, kv_size, kv_size], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_index, start_pos, k, v)
        # Grouped-query attention without copying K/V: the query heads that share a KV head are
        # folded into the query-length axis, so one attention call per KV head serves the group.
        group = self.num_heads // self.num_kv_heads
        q = q.reshape(batch, self.num_kv_heads, group * length, self.head_dim)
        mask = None
        if length > 1:
            query_pos = torch.arange(start_pos, start_pos + length, device=x.device)
            key_pos = torch.arange(k.shape[2], device=x.device)
            mask = (key_pos[None, :] <= query_pos[:, None]).repeat(group, 1)
        if cache is not None and cache.attendable is not None:
            attendable = cache.attendable[:, None, None, :k.shape[2]]
            if mask is None:
                mask = attendable
            else:  # a padding query still sees itself, so its (unused) output is finite, not NaN
                mask = (mask & attendable) | (key_pos[None, :] == query_pos[:, None]).repeat(group, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.view(batch, self.num_heads, length, self.head_dim).transpose(1, 2).reshape(batch, length, -1)
        return packed_linear(out, self.packed_o) if packed_applies(self.packed_o, out) else self.o_proj(out)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.packed_gate_up: PackedWeight | None = None
        self.packed_down: PackedWeight | None = None

    def linear_groups(self) -> list[tuple[tuple[nn.Linear, ...], PackedWeight | None]]:
        """The linears the packed path fuses (each group reads one input), with their packed weights."""
        return [((self.gate_proj, self.up_proj), self.packed_gate_up), ((self.down_proj,), self.packed_down)]

    def pack(self) -> None:
        self.packed_gate_up, self.packed_down = (pack_linears(*group) for group, _ in self.linear_groups())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if packed_applies(self.packed_gate_up, x):
            gate, up = packed_linear(x, self.packed_gate_up).chunk(2, dim=-1)
            return packed_linear(F.silu(gate) * up, self.packed_down)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int,
                cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.packed_head: PackedWeight | None = None
        # Token ids ranked by how often the model produces them (stored with the model, see draft_head).
        self.draft_vocab: torch.Tensor | None = None
        self._draft_heads: dict[int, tuple[torch.Tensor, torch.Tensor, PackedWeight | None]] = {}

    def pack_for_cpu_inference(self) -> bool:
        """Prepack the weights for CPU float32 decoding passes of a few rows (see above); returns whether it did.

        Call after the weights are final (after loading and merging adapters): packing copies them.
        """
        weight = self.embed_tokens.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return False
        self._draft_heads.clear()
        try:
            for layer in self.layers:
                layer.self_attn.pack()
                layer.mlp.pack()
            self.packed_head = pack_linears(self.lm_head)
        except (RuntimeError, AttributeError):  # a torch build without the oneDNN ops: keep the plain path
            self.unpack()
            return False
        return True

    def packing_pays(self, rows: tuple[int, ...] = (1, 5), repeats: int = 2) -> bool:
        """Whether the packed weights (already made) run a decoding step and a verification pass faster than
        the plain ones on this machine: every layer's matrix products timed both ways, interleaved, medians.
        About 0.5 s for a 135M model: the weights are streamed from memory as in real decoding."""

        work = [pair for layer in self.layers
                for pair in (*layer.self_attn.linear_groups(), *layer.mlp.linear_groups())]

        def plain_pass(m: int) -> None:
            for group, _ in work:
                for linear in group:
                    linear(inputs[m, group[0].in_features])

        def packed_pass(m: int) -> None:
            for group, packed in work:
                packed_linear(inputs[m, group[0].in_features], packed)

        seconds = {plain_pass: [], packed_pass: []}
        with torch.inference_mode():
            widths = {group[0].in_features for group, _ in work}
            inputs = {(m, width): torch.randn(1, m, width) for m in rows for width in widths}
            for _ in range(repeats + 1):  # the first round warms up (allocation, kernel selection)
                for run, times in seconds.items():
                    start = time.perf_counter()
                    for m in rows:
                        run(m)
                    times.append(time.perf_counter() - start)
        median = {run: sorted(times[1:])[repeats // 2] for run, times in seconds.items()}
        return median[packed_pass] < median[plain_pass]

    def unpack(self) -> None:
        """Drop the packed copies and draft heads (for example before changing weights)."""
        for layer in self.layers:
            layer.self_attn.packed_qkv = layer.self_attn.packed_o = None
            layer.mlp.packed_gate_up = layer.mlp.packed_down = None
        self.packed_head = None
        self._draft_heads.clear()

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

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

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids)

    def forward_layers(self, hidden: torch.Tensor, start_layer: int, end_layer: int, start_pos: int = 0,
                       cache: KVCache | None = None) -> torch.Tensor:
        """Run layers [start_layer, end_layer) over positions [start_pos, start_pos + T), writing their KV."""
        cos, sin = self.rope(start_pos, hidden.shape[1], hidden.dtype)
        for layer in self.layers[start_layer:end_layer]:
            hidden = layer(hidden, cos, sin, start_pos, cache)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The one exit head shared by every layer: final norm, then the LM head; float32 logits."""
        normed = self.norm(hidden)
        logits = packed_linear(normed, self.packed_head) if packed_applies(self.packed_head, normed) else self.lm_head(normed)
        return logits.float()

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
        if sliced is None:
            ids = self.draft_vocab[:vocab_size].to(self.lm_head.weight.device)
            weight = self.lm_head.weight.detach()[ids]
            packed = (pack_weight(weight), None) if self.packed_head is not None else None
            sliced = self._draft_heads[vocab_size] = (ids, weight, packed)
        ids, weight, packed = sliced
        normed = self.norm(hidden)
        logits = packed_linear(normed, packed) if packed_applies(packed, normed) else F.linear(normed, weight)
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"), dtype=torch.float32)
        return full.index_copy_(-1, ids, logits.float())

    def forward(self, token_ids: torch.Tensor, *, exit_layer: int | None = None, start_pos: int = 0,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits for every position, exiting after `exit_layer` layers (all layers when None)."""
        end = self.num_layers if exit_layer is None else exit_layer
        return self.head(self.forward_layers(self.embed(token_ids), 0, end, start_pos, cache))
