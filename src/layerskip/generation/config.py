"""Generation settings (named after the reference tool's flags), validated against a model."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch

from layerskip.errors import LayerSkipError
from layerskip.generation.sampling import Sampler
from layerskip.generation.strategies import Autoregressive, SelfSpeculative, Strategy
from layerskip.model.draft_adapter import DraftAdapter

STRATEGIES = ("autoregressive", "self_speculative")
SEED_LIMIT = 2 ** 63  # torch generators take 64-bit seeds
MAX_DRAFT_CANDIDATES = 16  # beyond a verification of about 16 rows a pass stops costing one step


def check_token_ids(ids: Sequence[Any], vocab_size: int, what: str) -> list[int]:
    """`ids` as a list of ints, each in [0, vocab_size), or a LayerSkipError naming the first that is not.

    The one check of user-given token ids (--prompt_ids, --stop_token_ids) that the CLI's commands and the
    library API share; `what` names them in the message ("prompt token id", "--stop_token_ids")."""
    checked = []
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int):
            raise LayerSkipError(f"{what} {token!r} is not an integer token id")
        if not 0 <= token < vocab_size:
            raise LayerSkipError(f"{what} {token} is outside the vocabulary [0, {vocab_size})")
        checked.append(token)
    return checked


def check_batching(batch_size: int = 1, max_speculative_batch: int | None = None) -> None:
    """The batch settings, or a LayerSkipError naming the one out of range: the one check that the batch API, the
    benchmark runner, correctness, the server's settings and the CLI (before a model loads) share."""
    if batch_size < 1:
        raise LayerSkipError(f"--batch_size must be at least 1, got {batch_size}")
    if max_speculative_batch is not None and max_speculative_batch < 0:
        raise LayerSkipError(f"--max_speculative_batch must be >= 0 (0: no limit), got {max_speculative_batch}")


@dataclasses.dataclass
class GenerationConfig:
    generation_strategy: str | None = None  # None: the model's stored default, else autoregressive
    exit_layer: int = -1               # -1: all layers (autoregressive) or the model's stored default
    num_speculations: int = -1         # -1: the model's stored default
    draft_vocab_size: int = -1         # self-speculative drafts score this many frequent tokens; 0: all; -1: stored
    draft_confidence: float = -1.0     # stop a round's drafts after one below this probability; 0: never; -1: stored
    draft_candidates: int = -1         # candidates at a round's last draft position (a one-level tree); -1: stored
    max_steps: int = 512
    sample: bool = True
    temperature: float = 0.6
    top_k: int = 0
    top_p: float = 0.9
    seed: int = 42
    stop_words: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "GenerationConfig":
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise LayerSkipError(f"unknown generation option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**options)

    def resolved(self, num_layers: int, defaults: dict[str, Any], vocab_size: int | None = None) -> "GenerationConfig":
        """A copy with the model's defaults filled in, or a LayerSkipError naming what is wrong; with
        `vocab_size`, --stop_token_ids are checked against the vocabulary too.

        A model trained for LayerSkip stores `generation_strategy: self_speculative` with its exit layer and
        drafts per round (chosen by a sweep), so plain `generate` calls get the fast setting.
        """
        typed = self.typed()
        if typed is not self:
            return typed.resolved(num_layers, defaults, vocab_size)
        strategy = self.generation_strategy or str(defaults.get("generation_strategy", "autoregressive"))
        if strategy not in STRATEGIES:
            raise LayerSkipError(f"unknown --generation_strategy '{strategy}': choose one of {', '.join(STRATEGIES)}")
        exit_layer, speculations = self.exit_layer, self.num_speculations
        draft_vocab, confidence, candidates = 0, 0.0, 1  # draft settings: self-speculative only
        if strategy == "self_speculative":
            # Stored defaults come from a sweep on that model; otherwise a quarter of the depth, 4 drafts.
            exit_layer = exit_layer if exit_layer != -1 else int(defaults.get("exit_layer", max(1, num_layers // 4)))
            speculations = speculations if speculations != -1 else int(defaults.get("num_speculations", 4))
            if not 1 <= exit_layer <= num_layers - 1:
                raise LayerSkipError(f"--exit_layer {exit_layer} is outside [1, {num_layers - 1}] "
                                     f"for self-speculative decoding of this {num_layers}-layer model")
            if speculations < 1:
                raise LayerSkipError(f"--num_speculations must be at least 1, got {speculations}")
            draft_vocab = self.draft_vocab_size if self.draft_vocab_size != -1 else int(defaults.get("draft_vocab_size", 0))
            confidence = self.draft_confidence if self.draft_confidence != -1 else float(defaults.get("draft_confidence", 0))
            stored = len(defaults.get("draft_vocab", []))
            if not 0 <= draft_vocab <= stored:
                raise LayerSkipError(f"--draft_vocab_size {draft_vocab} is outside [0, {stored}]: this model stores "
                                     f"{'no draft vocabulary' if not stored else f'{stored} ranked draft tokens'}")
            if not 0 <= confidence < 1:
                raise LayerSkipError(f"--draft_confidence must be in [0, 1), got {confidence}")
            candidates = self.draft_candidates if self.draft_candidates != -1 else \
                int(defaults.get("draft_candidates", 1))
            if not 1 <= candidates <= MAX_DRAFT_CANDIDATES:
                raise LayerSkipError(f"--draft_candidates must be in [1, {MAX_DRAFT_CANDIDATES}], got {candidates}")
        elif exit_layer != -1 and not 1 <= exit_layer <= num_layers:
            raise LayerSkipError(f"--exit_layer {exit_layer} is outside [1, {num_layers}] for this {num_layers}-layer model")
        if self.max_steps < 1:
            raise LayerSkipError(f"--max_steps must be at least 1, got {self.max_steps}")
        if self.sample and not 0 <= self.temperature < math.inf:  # also refuses nan
            raise LayerSkipError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not -SEED_LIMIT <= self.seed < SEED_LIMIT:
            raise LayerSkipError(f"--seed {self.seed} is out of range: use an integer in [-2**63, 2**63)")
        if self.top_k < 0:
            raise LayerSkipError(f"--top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LayerSkipError(f"--top_p must be in (0, 1], got {self.top_p}")
        if vocab_size is not None:
            check_token_ids(self.stop_token_ids, vocab_size, "--stop_token_ids")
        return dataclasses.replace(self, generation_strategy=strategy, exit_layer=exit_layer,
                                   num_speculations=speculations, draft_vocab_size=draft_vocab,
                                   draft_confidence=confidence, draft_candidates=candidates)

    def typed(self) -> "GenerationConfig":
        """A copy with numbers as floats where floats are meant, or a LayerSkipError naming an option whose
        value is of the wrong type (library callers pass whatever they have, JSON included)."""
        updates: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), FIELD_TYPES[field.name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = updates[field.name] = float(value)
            ok = {str: lambda v: v is None or isinstance(v, str), list: lambda v: isinstance(v, (list, tuple)),
                  int: lambda v: isinstance(v, int) and not isinstance(v, bool), float: lambda v: isinstance(v, float),
                  bool: lambda v: isinstance(v, bool)}[kind](value)
            if not ok:
                raise LayerSkipError(f"generation option {field.name} must be {TYPE_NAMES[kind]}, got {value!r:.40}")
        if any(not isinstance(word, str) for word in self.stop_words):
            raise LayerSkipError("generation option stop_words must be a list of strings")
        return dataclasses.replace(self, **updates) if updates else self

    def strategy(self, draft_adapter: DraftAdapter | None = None, draft_adapter_name: str = "") -> Strategy:
        """The decoding strategy for a resolved config; self-speculative drafts read their exit through
        `draft_adapter` when it was trained for that exit layer (at another exit they are plain)."""
        if self.generation_strategy == "self_speculative":
            if draft_adapter is not None and draft_adapter.config.exit_layer != self.exit_layer:
                draft_adapter = None
            # Unresolved draft settings (-1, "the model's stored value") fall back to the full head, always k drafts.
            return SelfSpeculative(self.exit_layer, self.num_speculations, draft_vocab_size=max(0, self.draft_vocab_size),
                                   draft_confidence=max(0.0, self.draft_confidence),
                                   draft_candidates=max(1, self.draft_candidates), draft_adapter=draft_adapter,
                                   draft_adapter_name=draft_adapter_name if draft_adapter is not None else "")
        return Autoregressive(None if self.exit_layer == -1 else self.exit_layer)

    def sampler(self, device: torch.device) -> Sampler:
        return Sampler(sample=self.sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                       seed=self.seed, device=device)


FIELD_TYPES = {"generation_strategy": str, "exit_layer": int, "num_speculations": int, "draft_vocab_size": int,
               "draft_confidence": float, "draft_candidates": int, "max_steps": int, "sample": bool, "temperature": float, "top_k": int,
               "top_p": float, "seed": int, "stop_words": list, "stop_token_ids": list, "ignore_eos": bool}
TYPE_NAMES = {str: "a string", list: "a list", int: "an integer", float: "a number", bool: "true or false"}
