"""Tensor parallelism for decoding under torchrun: each rank holds a slice of every layer and of the vocabulary.

The plan is Megatron's, written for this model:
- q, k, v column-wise by key-value head: a rank's query heads are those of its KV heads, so attention and the KV
  cache stay local; o row-wise over the same heads, then an all-reduce of the partial sums;
- gate and up column-wise, down row-wise over the same slice of the MLP, then an all-reduce;
- the embedding and the head by vocabulary rows: a token's embedding comes from the one rank that holds its row
  (an all-reduce of that row and zeros, exact), and each rank's logits are all-gathered.

Slices are as even as the heads allow (SmolLM2-135M's 3 KV heads split 2 + 1 over two ranks), and MLP slices are
multiples of 32 columns, so GGUF blocks split without requantizing. Each rank reads only its slices from the
safetensors files. After the gather every rank holds the same logits, so every rank runs the same rounds (greedy
and seeded sampled choices agree) and only rank 0 reports. Over two ranks an all-reduce is a + b, the same
whatever the other rows of the pass, so the native kernels' row invariance holds and greedy self-speculation still
equals greedy plain decoding; over more, the sums' order follows the tensor's chunking.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from layerskip.model.config import ModelConfig

BLOCK = 32  # the MLP's slices are whole GGUF blocks of its input


def split(size: int, parts: int, index: int, multiple: int = 1) -> tuple[int, int]:
    """Part `index` of [0, size) cut into `parts` near-equal ranges, in whole units of `multiple` when they fit."""
    unit = multiple if size % multiple == 0 and size // multiple >= parts else 1
    units = size // unit
    return units * index // parts * unit, units * (index + 1) // parts * unit


@dataclasses.dataclass(frozen=True)
class Shard:
    """One rank's slices: [start, end) of the KV heads (with their query heads), of the MLP, of the vocabulary."""

    rank: int
    world_size: int
    kv_heads: tuple[int, int]
    heads: tuple[int, int]
    inner: tuple[int, int]
    vocab: tuple[int, int]

    @classmethod
    def plan(cls, config: ModelConfig, rank: int, world_size: int) -> Shard:
        if config.num_key_value_heads < world_size:
            raise ValueError(f"{world_size} ranks, but the model has only {config.num_key_value_heads} key-value "
                             f"heads to share among them")
        kv_heads = split(config.num_key_value_heads, world_size, rank)
        group = config.num_attention_heads // config.num_key_value_heads
        return cls(rank, world_size, kv_heads, (kv_heads[0] * group, kv_heads[1] * group),
                   split(config.intermediate_size, world_size, rank, BLOCK), split(config.vocab_size, world_size, rank))

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The model config of this rank's layers (the vocabulary stays whole: token ids are global)."""
        return dataclasses.replace(config, num_attention_heads=self.heads[1] - self.heads[0],
                                   num_key_value_heads=self.kv_heads[1] - self.kv_heads[0],
                                   intermediate_size=self.inner[1] - self.inner[0])

    def cut(self, name: str, head_dim: int) -> tuple[int, int, int] | None:
        """(dim, start, end) of this rank's part of parameter `name` (our names), or None for a whole copy."""
        heads = (self.heads[0] * head_dim, self.heads[1] * head_dim)
        kv = (self.kv_heads[0] * head_dim, self.kv_heads[1] * head_dim)
        module, what = name.split(".")[-2:]
        if module == "q_proj":
            return (0, *heads)
        if module in ("k_proj", "v_proj"):
            return (0, *kv)
        if module in ("gate_proj", "up_proj"):
            return (0, *self.inner)
        if module in ("embed_tokens", "lm_head"):
            return (0, *self.vocab)
        if module in ("o_proj", "down_proj") and what == "weight":
            return (1, *(heads if module == "o_proj" else self.inner))
        return None

    def reduced_bias(self, name: str) -> bool:
        """A bias added after an all-reduce: only rank 0 keeps it, or it would count once per rank."""
        return name.endswith(("o_proj.bias", "down_proj.bias"))


class TensorParallel:
    """The collectives of a sharded model: what the layers, the embedding and the head call."""

    def __init__(self, shard: Shard, config: ModelConfig):
        self.shard, self.config = shard, config  # config: the whole model's
        self.vocab_ranges = [split(config.vocab_size, shard.world_size, r) for r in range(shard.world_size)]
        self.widest_vocab = max(end - start for start, end in self.vocab_ranges)  # every rank's part padded to it

    @property
    def vocab_start(self) -> int:
        return self.shard.vocab[0]

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum a row-parallel product's partial results across ranks, in place."""
        dist.all_reduce(partial)
        return partial

    def embed(self, weight: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings from vocabulary-sharded rows: each token's row from the rank that holds it."""
        local = token_ids - self.vocab_start
        mine = (local >= 0) & (local < weight.shape[0])
        hidden = F.embedding(local.clamp(0, weight.shape[0] - 1), weight) * mine[..., None].to(weight.dtype)
        return self.all_reduce(hidden)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's logits [..., its vocabulary rows] as the whole vocabulary's, on every rank."""
        padded = F.pad(logits, (0, self.widest_vocab - logits.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in self.vocab_ranges]
        dist.all_gather(parts, padded)
        return torch.cat([part[..., :end - start] for part, (start, end) in zip(parts, self.vocab_ranges)], -1)
