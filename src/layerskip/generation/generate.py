"""The decoding driver: runs a strategy's rounds, commits tokens, applies stop conditions, keeps statistics."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import torch

from layerskip.generation.sampling import Sampler
from layerskip.generation.stopping import StoppingCriteria, cut_at_stop_words
from layerskip.generation.strategies import DecodeContext, Strategy
from layerskip.generation.streaming import Streamer
from layerskip.loading.tokenizer import Tokenizer
from layerskip.model import Transformer


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_drafts: int = 0
    draft_forwards: int = 0
    verify_forwards: int = 0
    accepted_length_counts: list[int] = dataclasses.field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def time_per_token(self) -> float:
        return self.seconds / self.new_tokens if self.new_tokens else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted drafts / drafted tokens; None for strategies that do not draft."""
        return self.accepted_drafts / self.drafted_tokens if self.drafted_tokens else None

    @property
    def mean_tokens_per_round(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        return {**fields, "tokens_per_second": self.tokens_per_second, "time_per_token": self.time_per_token,
                "acceptance_rate": self.acceptance_rate, "mean_tokens_per_round": self.mean_tokens_per_round}


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]              # new tokens only (an EOS or stop token that ended decoding included)
    text: str | None                  # decoded new text, cut before a stop word; None without a tokenizer
    finish_reason: str                # eos | stop_token | stop_word | max_steps | context_length
    stats: GenerationStats
    settings: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "settings": self.settings, "stats": self.stats.as_dict()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate_ids(model: Transformer, prompt_ids: Sequence[int], strategy: Strategy, sampler: Sampler, *,
                 max_new_tokens: int, eos_token_ids: Sequence[int] = (), stop_token_ids: Sequence[int] = (),
                 stop_words: Sequence[str] = (), tokenizer: Tokenizer | None = None,
                 streamer: Streamer | None = None) -> GenerationResult:
    """Decode after `prompt_ids` until a stop condition; the caller has validated the inputs."""
    max_length = min(len(prompt_ids) + max_new_tokens, model.config.max_position_embeddings)
    stopping = StoppingCriteria(eos_token_ids=eos_token_ids, stop_token_ids=stop_token_ids, stop_words=stop_words,
                                max_new_tokens=max_new_tokens, max_length=max_length, tokenizer=tokenizer)
    tokens = list(prompt_ids)
    context = DecodeContext(model=model, tokens=tokens, max_length=max_length, sampler=sampler,
                            eos_token_ids=frozenset(eos_token_ids),
                            on_draft=streamer.on_draft if streamer is not None else None)
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    new_tokens: list[int] = []
    finish_reason = None
    device = model.inv_freq.device
    synchronize(device)
    start = time.perf_counter()
    rounds = strategy.rounds(context)
    for step in rounds:
        committed = []
        for token in step.tokens:
            tokens.append(token)
            new_tokens.append(token)
            committed.append(token)
            finish_reason = stopping.finish_reason(new_tokens, len(tokens))
            if finish_reason:
                break
        stats.rounds += 1
        stats.draft_forwards += step.draft_forwards
        stats.verify_forwards += step.verify_forwards
        if step.drafted:
            stats.drafted_tokens += len(step.drafted)
            stats.accepted_drafts += step.accepted_drafts
            counts = stats.accepted_length_counts
            counts.extend([0] * (step.accepted_drafts + 1 - len(counts)))
            counts[step.accepted_drafts] += 1
        if streamer is not None:
            streamer.on_tokens(committed, step)
        if finish_reason:
            break
    rounds.close()
    synchronize(device)
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = len(new_tokens)
    text = None
    if tokenizer is not None:
        text, _ = cut_at_stop_words(tokenizer.decode(new_tokens), stop_words)
    result = GenerationResult(token_ids=new_tokens, text=text, finish_reason=finish_reason or "max_steps",
                              stats=stats, settings=strategy.describe())
    if streamer is not None:
        streamer.on_end(result)
    return result
