"""Decoding strategies behind one interface: each is a coroutine of rounds over a shared token list.

A strategy reads the committed tokens (prompt + everything accepted so far) at the start of each
round and yields a `Round`; the engine commits the round's tokens (or fewer, when a stop condition
fires mid-round). Strategies never mutate the token list and never see stop conditions.

Within a round a strategy asks for the model's large products by yielding a request (`Layers`, `Head`, or
`Adapt` for a draft adapter) and is sent the result: the engine (engine.py) runs the same request of many
sequences as one batched pass.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable, Generator

import torch

from layerskip.generation.sampling import Sampler
from layerskip.model import ExitHiddenBuffer, KVCache, Transformer
from layerskip.model.cache import CacheRow
from layerskip.model.draft_adapter import DraftAdapter


@dataclasses.dataclass
class Round:
    """One step of a strategy: the drafts it proposed and the tokens it offers to commit."""

    tokens: list[int]                 # accepted drafts followed by one token from the deepest layer used
    drafted: list[int] = dataclasses.field(default_factory=list)
    accepted_drafts: int = 0
    draft_forwards: int = 0           # passes through the draft layers [0, E) that ended in the exit head
    verify_forwards: int = 0          # passes through the verification layers [E, L)


@dataclasses.dataclass
class Layers:
    """Run layers [start_layer, end_layer) over one sequence's rows [1, T, H] at positions [start_pos, start_pos + T)
    of its cache (`positions`: each row's own RoPE position); the result is the hidden states [1, T, H]."""

    hidden: torch.Tensor
    start_layer: int
    end_layer: int
    start_pos: int
    positions: list[int] | None = None


@dataclasses.dataclass
class Head:
    """The shared head over hidden [R, H] (`vocab_size` > 0: the draft slice); the result is logits [R, vocab]."""

    hidden: torch.Tensor
    vocab_size: int = 0


@dataclasses.dataclass
class Adapt:
    """A draft adapter over one sequence's exit states [1, T, H] (and `context`, when it reads one) at positions
    [start_pos, start_pos + T) of its own cache; the result is the states for the head [1, T, H]."""

    adapter: DraftAdapter
    hidden: torch.Tensor
    context: torch.Tensor | None
    start_pos: int


Request = Layers | Head | Adapt


@dataclasses.dataclass
class DecodeContext:
    """What every strategy needs for one generation call."""

    model: Transformer
    tokens: list[int]                 # committed tokens; the driver appends, strategies only read
    max_length: int                   # total tokens (prompt + new) allowed; the caches hold this many
    sampler: Sampler
    eos_token_ids: frozenset[int]
    cache: KVCache | CacheRow | None = None  # the sequence's KV cache (its row of the engine's), for masks and moves
    on_draft: Callable[[list[int]], None] | None = None
    speculate: bool = True            # the engine's say for the next round: False, a speculative round drafts nothing
    branch: bool = True               # and False: its last draft position carries one candidate only
    prefill_chunk: int = 0            # > 0: a longer prompt goes through in rounds of this many tokens, no token out

    def next_prefill_chunk(self, done: int) -> list[int] | None:
        """The next chunk of a prompt still longer than a chunk past position `done`, else None."""
        pending = self.tokens[done:]
        return pending[:self.prefill_chunk] if self.prefill_chunk and len(pending) > self.prefill_chunk else None

    def token_tensor(self, tokens: list[int]) -> torch.Tensor:
        return torch.tensor([tokens], dtype=torch.long, device=self.model.inv_freq.device)

    def exit_buffer(self, capacity: int | None = None) -> ExitHiddenBuffer:
        weight = self.model.embed_tokens.weight
        return ExitHiddenBuffer(self.model.config, capacity or self.max_length, dtype=weight.dtype,
                                device=weight.device)


Steps = Generator[Request | Round, torch.Tensor | None, None]


class Strategy(abc.ABC):
    name: str

    @abc.abstractmethod
    def rounds(self, ctx: DecodeContext) -> Steps:
        """Yield requests (sent their results) and rounds, until the engine stops asking."""

    def describe(self) -> dict[str, int | str]:
        return {"generation_strategy": self.name}


class Autoregressive(Strategy):
    """One token per forward pass. With `exit_layer` E < L it is early-exit inference: layers [0, E), then the head."""

    name = "autoregressive"

    def __init__(self, exit_layer: int | None = None):
        self.exit_layer = exit_layer

    def describe(self) -> dict[str, int | str]:
        return {**super().describe(), **({"exit_layer": self.exit_layer} if self.exit_layer else {})}

    def rounds(self, ctx: DecodeContext) -> Steps:
        model = ctx.model
        depth = self.exit_layer or model.num_layers
        done = 0  # positions [0, done) are in the KV cache
        while True:
            chunk = ctx.next_prefill_chunk(done)
            if chunk is not None:  # a long prompt, a chunk a round, so the batch's other sequences decode on
                yield Layers(model.embed(ctx.token_tensor(chunk)), 0, depth, done)
                done += len(chunk)
                yield Round(tokens=[])
                continue
            pending = ctx.tokens[done:]
            hidden = yield Layers(model.embed(ctx.token_tensor(pending)), 0, depth, done)
            token, _ = ctx.sampler.choose((yield Head(hidden[0, -1:])))
            done += len(pending)
            yield Round(tokens=[token])


class AdapterDrafts:
    """A draft adapter's state for one sequence: the final-layer states verification produced (its context input;
    row p holds position p-1's, row 0 stays zero), how far its KV cache (kind layer; the engine keeps it) was built
    from verified context, and its output at the last position it ran.

    Drafted positions run with the adapter's own output as context; once verification accepts them, the next
    round's first call rebuilds them from the true final states, in one pass of accepted + 1 rows. Its calls are
    generators that yield the `Adapt` request and return the adapter's output there.
    """

    def __init__(self, ctx: DecodeContext, adapter: DraftAdapter):
        self.adapter = adapter
        self.contexts = ctx.exit_buffer(ctx.max_length + 1) if adapter.config.context else None
        self.built = 0                             # positions [0, built) of its cache saw verified context
        self.last: torch.Tensor | None = None      # its output at the last position it ran

    def first(self, exits: ExitHiddenBuffer, end: int) -> Generator[Adapt, torch.Tensor, torch.Tensor]:
        """Its state for the head at position end - 1, the round's first draft, from verified context."""
        start = self.built if self.adapter.has_cache else end - 1
        self.built = end
        return (yield from self.run(exits.read(start, end), start))

    def next(self, exit_hidden: torch.Tensor, position: int) -> Generator[Adapt, torch.Tensor, torch.Tensor]:
        """At a drafted position: the context is its own output at the position before."""
        return (yield from self.run(exit_hidden, position, self.last))

    def run(self, exit_hidden: torch.Tensor, start: int,
            context: torch.Tensor | None = None) -> Generator[Adapt, torch.Tensor, torch.Tensor]:
        if self.contexts is None:
            context = None
        elif context is None:
            context = self.contexts.read(start, start + exit_hidden.shape[1])
        self.last = (yield Adapt(self.adapter, exit_hidden, context, start))[:, -1:]
        return self.last

    def verified(self, start: int, final_hidden: torch.Tensor) -> None:
        """The final layer's states of positions [start, start + T) (the accepted ones among them are exact)."""
        if self.contexts is not None:
            self.contexts.write(start + 1, final_hidden)


class SelfSpeculative(Strategy):
    """Draft with layers [0, E) and the shared head, verify with layers [E, L), one KV cache for both.

    Per round: the pending tokens and each new draft go through [0, E) once, leaving their exit hidden
    states in a position-indexed buffer; verification runs [E, L) over the buffered states of every
    position not yet seen by the upper layers (on the first round: the whole prompt). Rejected positions
    are simply overwritten by the next round. With a draft adapter, drafts read the exit states through it
    (AdapterDrafts); verification reads them as they are.

    With `draft_candidates` m > 1 the round's last draft position carries m candidates (a tree of one level): the
    draft and m - 1 alternatives (Sampler.alternatives) sit in consecutive cache slots at one RoPE position, each
    masked from the ones before it, and go through every layer in the same passes as the other drafts. Verification
    tries them in turn; an accepted alternative's keys, values and exit state move to the position's own slot.
    That one extra row per alternative is nearly free while a pass is bound by reading the weights.
    """

    name = "self_speculative"

    def __init__(self, exit_layer: int, num_speculations: int, *, draft_vocab_size: int = 0,
                 draft_confidence: float = 0.0, draft_candidates: int = 1, draft_adapter: DraftAdapter | None = None,
                 draft_adapter_name: str = ""):
        if draft_adapter is not None and draft_adapter.config.exit_layer != exit_layer:
            raise ValueError(f"the draft adapter reads exit layer {draft_adapter.config.exit_layer}, not {exit_layer}")
        self.exit_layer = exit_layer
        self.num_speculations = num_speculations
        self.draft_vocab_size = draft_vocab_size    # > 0: drafts score only this many frequent tokens
        self.draft_confidence = draft_confidence    # > 0: a round stops drafting after a less confident draft
        self.draft_candidates = draft_candidates    # > 1: candidates at the round's last draft position
        self.draft_adapter = draft_adapter          # drafts read the exit states through it
        self.draft_adapter_name = draft_adapter_name

    def describe(self) -> dict[str, int | str | float]:
        extra = {"draft_vocab_size": self.draft_vocab_size} if self.draft_vocab_size else {}
        extra.update({"draft_confidence": self.draft_confidence} if self.draft_confidence else {})
        extra.update({"draft_candidates": self.draft_candidates} if self.draft_candidates > 1 else {})
        extra.update({"draft_adapter": self.draft_adapter_name or "yes"} if self.draft_adapter is not None else {})
        return {**super().describe(), "exit_layer": self.exit_layer, "num_speculations": self.num_speculations,
                **extra}

    def confident(self, token: int, probs: torch.Tensor | None, logits: torch.Tensor) -> bool:
        """Whether to draft on after this draft."""
        if not self.draft_confidence:
            return True
        confidence = probs[token] if probs is not None else torch.softmax(logits.reshape(-1), -1)[token]
        return bool(confidence >= self.draft_confidence)

    def rounds(self, ctx: DecodeContext) -> Steps:
        model, exit_layer = ctx.model, self.exit_layer
        cache, exits = ctx.cache, ctx.exit_buffer()
        adapted = AdapterDrafts(ctx, self.draft_adapter) if self.draft_adapter is not None else None
        done, prompt_length = 0, len(ctx.tokens)  # positions [0, done) have been through every layer and are final
        while True:
            chunk = ctx.next_prefill_chunk(done)
            if chunk is not None:  # a long prompt, a chunk a round through every layer, so the others decode on
                hidden = yield Layers(model.embed(ctx.token_tensor(chunk)), 0, exit_layer, done)
                exits.write(done, hidden)
                hidden = yield Layers(hidden, exit_layer, model.num_layers, done)
                if adapted is not None:
                    adapted.verified(done, hidden)
                done += len(chunk)
                yield Round(tokens=[])
                continue
            committed = len(ctx.tokens)
            budget = min(self.num_speculations, ctx.max_length - committed - 1) if ctx.speculate else 0
            if adapted is not None and done < prompt_length:
                budget = 0  # the prompt goes through every layer first: the adapter's context needs its final states
            drafts: list[int] = []
            draft_probs: list[torch.Tensor | None] = []
            alternatives: list[int] = []
            rope: list[int] | None = None  # the rows' positions, when candidates share one
            pending, position, finished = ctx.tokens[done:], done, budget == 0
            while True:
                hidden = yield Layers(model.embed(ctx.token_tensor(pending)), 0, exit_layer, position, rope)
                exits.write(position, hidden)
                position += len(pending)
                if finished:
                    break  # this pass only fed the last draft (and its alternatives) through [0, E) for verification
                state = hidden[:, -1:]
                if adapted is not None:
                    state = yield from (adapted.next(hidden, position - 1) if drafts else adapted.first(exits, position))
                logits = yield Head(state[0, -1:], self.draft_vocab_size)
                token, probs = ctx.sampler.choose(logits)
                drafts.append(token)
                draft_probs.append(probs)
                pending = [token]
                finished = len(drafts) == budget or token in ctx.eos_token_ids or not self.confident(token, probs, logits)
                if finished and self.draft_candidates > 1 and ctx.branch:
                    room = ctx.max_length - position - 1  # alternative i sits in slot position + i
                    alternatives = ctx.sampler.alternatives(logits, probs, token, min(self.draft_candidates - 1, room))
                    pending = [token] + alternatives
                    rope = [position] * len(pending)
                    cache.set_attendable(position, position + len(alternatives), False)
            if ctx.on_draft is not None and drafts:
                ctx.on_draft(drafts)
            last = position - 1 - len(alternatives)  # the last draft's slot
            if rope is not None:
                rope = list(range(done, last)) + rope
            hidden = yield Layers(exits.read(done, position), exit_layer, model.num_layers, done, rope)
            logits = yield Head(hidden[0, -(len(drafts) + 1 + len(alternatives)):])
            verdict = ctx.sampler.verify(drafts, draft_probs, logits[:len(drafts) + 1], alternatives,
                                         logits[len(drafts) + 1:])
            accepted_tokens = drafts[:verdict.accepted]
            if verdict.candidate:
                accepted_tokens[-1] = alternatives[verdict.candidate - 1]
                cache.copy_position(last + verdict.candidate, last)
                exits.copy_position(last + verdict.candidate, last)
                hidden[:, last - done] = hidden[:, last + verdict.candidate - done]
            if alternatives:
                cache.set_attendable(last, last + len(alternatives), True)
            if adapted is not None:
                adapted.verified(done, hidden)
            done = committed + verdict.accepted
            yield Round(tokens=accepted_tokens + [verdict.next_token], drafted=drafts, accepted_drafts=verdict.accepted,
                        draft_forwards=len(drafts), verify_forwards=1)
