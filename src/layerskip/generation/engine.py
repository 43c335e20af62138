"""The one decoding engine: sequences join and leave a batch, each round of every sequence runs in batched passes.

Each sequence is a strategy's coroutine (strategies.py) over its own tokens, with its own sampler, stop
conditions and statistics. Its rows sit at their own positions in one shared KV cache (a row per slot), so
sequences of different lengths, accepting different numbers of drafts, share every pass without copies. A step
runs one round of every sequence: it collects their requests, runs the requests of the same kind together (head
calls first, then draft adapter calls, then layer ranges from the lowest), and sends each sequence its share,
until every sequence has yielded its round; then it commits each round's tokens up to the first stop condition.

`generate_ids` is one sequence through it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from layerskip.generation.sampling import Sampler
from layerskip.generation.stopping import StoppingCriteria, cut_at_stop_words
from layerskip.generation.strategies import Adapt, DecodeContext, Head, Layers, Request, Round, Strategy
from layerskip.generation.streaming import Streamer
from layerskip.loading.tokenizer import Tokenizer
from layerskip.model import KVCache, Transformer


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


class SequenceState:
    """One sequence in the engine: its context, its strategy's coroutine, its stop conditions and statistics."""

    def __init__(self, ctx: DecodeContext, strategy: Strategy, stopping: StoppingCriteria, *, slot: int,
                 streamer: Streamer | None, stop_words: Sequence[str], tokenizer: Tokenizer | None):
        self.ctx, self.strategy, self.stopping, self.slot = ctx, strategy, stopping, slot
        self.streamer, self.stop_words, self.tokenizer = streamer, stop_words, tokenizer
        self.stats = GenerationStats(prompt_tokens=len(ctx.tokens))
        self.new_tokens: list[int] = []
        self.finish_reason: str | None = None
        self.started = time.perf_counter()
        self.steps = strategy.rounds(ctx)
        self.request: Request | None = None  # what it waits for; None: between rounds

    def commit(self, step: Round) -> None:
        """The round's tokens, one at a time, up to the first stop condition; and its statistics. A round of a
        prompt's chunk brings none, and counts for nothing."""
        if not step.tokens:
            return
        committed = []
        for token in step.tokens:
            self.ctx.tokens.append(token)
            self.new_tokens.append(token)
            committed.append(token)
            self.finish_reason = self.stopping.finish_reason(self.new_tokens, len(self.ctx.tokens))
            if self.finish_reason:
                break
        stats = self.stats
        stats.rounds += 1
        stats.draft_forwards += step.draft_forwards
        stats.verify_forwards += step.verify_forwards
        if step.drafted:
            stats.drafted_tokens += len(step.drafted)
            stats.accepted_drafts += step.accepted_drafts
            counts = stats.accepted_length_counts
            counts.extend([0] * (step.accepted_drafts + 1 - len(counts)))
            counts[step.accepted_drafts] += 1
        if self.streamer is not None:
            self.streamer.on_tokens(committed, step)

    def result(self) -> GenerationResult:
        self.steps.close()
        self.stats.seconds = time.perf_counter() - self.started
        self.stats.new_tokens = len(self.new_tokens)
        text = None
        if self.tokenizer is not None:
            text, _ = cut_at_stop_words(self.tokenizer.decode(self.new_tokens), self.stop_words)
        result = GenerationResult(token_ids=self.new_tokens, text=text, finish_reason=self.finish_reason or "max_steps",
                                  stats=self.stats, settings=self.strategy.describe())
        if self.streamer is not None:
            self.streamer.on_end(result)
        return result


# What a pass over the weights costs beyond its rows, in rows: R rows of float32 cost about max(1, 0.5 + 0.085 R)
# one-row passes on the 2-core development host (reading the weights; then their arithmetic), that is
# max(2 F, F + R) rows with F = 6. Fewer for 4-bit weights; far more on a GPU, where the figure is a guess until
# measured there (issue 18).
PASS_OVERHEAD_ROWS = {"cpu": 6, "cuda": 256}


class BatchEngine:
    """Up to `slots` sequences decoding together, each up to `capacity` tokens (prompt included).

    add() puts a sequence in a free slot (a ValueError when none is free: the caller queues); step() runs one round
    of every sequence and returns those that finished, each removed and its slot free for the next; remove() takes
    one out before it finishes. Nothing of a sequence stays behind in its slot: every position is written before
    it is read.

    With `max_speculative_batch` N > 0, greedy self-speculative sequences draft only in rounds where at most N
    sequences decode, and take one token a round (every layer, as plain decoding) in a larger batch: there the
    batch's rows already keep the CPU's arithmetic busy, so a verification pass of several rows a sequence costs
    more than the drafts it accepts save (docs/BENCHMARKS.md). For the same reason a greedy sequence's tree
    drafts (--draft_candidates) branch only while it decodes alone: in a batch each candidate is one more row.
    Greedy output is the same either way. Sampled sequences always keep their strategy: switching would make a
    seeded sample depend on the batch it shares.

    With `prefill_chunk` C > 0 a prompt longer than C goes through in rounds of C tokens, so a long prompt that
    joins does not stall the others' decoding for its whole prefill (a server's inter-token latency); the result
    is the same, every row being computed as it would be in one pass.
    """

    def __init__(self, model: Transformer, *, slots: int, capacity: int, max_speculative_batch: int = 0,
                 prefill_chunk: int = 0):
        weight = model.embed_tokens.weight
        self.model, self.slots, self.max_speculative_batch = model, slots, max_speculative_batch
        self.prefill_chunk = prefill_chunk
        self.pass_overhead = PASS_OVERHEAD_ROWS.get(weight.device.type, PASS_OVERHEAD_ROWS["cuda"])
        self.capacity = min(capacity, model.config.max_position_embeddings)
        self.cache = model.kv_cache(self.capacity, slots)
        self.free = list(range(slots))
        self.running: list[SequenceState] = []
        self.adapter_caches: dict[int, KVCache | None] = {}  # each draft adapter's own cache, a row per slot

    def add(self, prompt_ids: Sequence[int], strategy: Strategy, sampler: Sampler, *, max_new_tokens: int,
            eos_token_ids: Sequence[int] = (), stop_token_ids: Sequence[int] = (), stop_words: Sequence[str] = (),
            tokenizer: Tokenizer | None = None, streamer: Streamer | None = None) -> SequenceState:
        if not self.free:
            raise ValueError(f"all {self.slots} slots of the batch are in use")
        slot = self.free.pop(0)
        max_length = min(len(prompt_ids) + max_new_tokens, self.capacity)
        stopping = StoppingCriteria(eos_token_ids=eos_token_ids, stop_token_ids=stop_token_ids, stop_words=stop_words,
                                    max_new_tokens=max_new_tokens, max_length=max_length, tokenizer=tokenizer)
        cache = self.cache if self.slots == 1 else self.cache.row(slot)
        ctx = DecodeContext(model=self.model, tokens=list(prompt_ids), max_length=max_length, sampler=sampler,
                            eos_token_ids=frozenset(eos_token_ids), cache=cache,
                            on_draft=streamer.on_draft if streamer is not None else None,
                            prefill_chunk=self.prefill_chunk)
        sequence = SequenceState(ctx, strategy, stopping, slot=slot, streamer=streamer, stop_words=stop_words,
                                 tokenizer=tokenizer)
        self.running.append(sequence)
        return sequence

    def remove(self, sequence: SequenceState) -> None:
        """Take a running sequence out of the batch (a cancelled request); its slot is free for the next."""
        self.running.remove(sequence)
        sequence.steps.close()
        self.free.append(sequence.slot)

    def each(self, indices: Iterable[int], add: Callable[[int], SequenceState]) -> Iterator[tuple[int, SequenceState]]:
        """Decode a queue of sequences (`add(index)` puts one in the batch) as slots free up: (index, sequence) for
        each, as it finishes."""
        queue, owners = list(indices), {}
        while queue or self.running:
            while queue and self.free:
                index = queue.pop(0)
                owners[add(index)] = index
            for sequence in self.step():
                yield owners.pop(sequence), sequence

    def step(self) -> list[SequenceState]:
        """One round of every running sequence; the ones that finished (their result() is ready)."""
        running = len(self.running)
        for sequence in self.running:
            sampler = sequence.ctx.sampler
            sequence.ctx.speculate = self.speculates(sampler, running)
            sequence.ctx.branch = sampler.sample or running == 1
            sequence.request = next(sequence.steps)
        waiting = list(self.running)
        while waiting:
            group = self.next_group(waiting)
            for sequence, result in zip(group, self.run(group)):
                item = sequence.steps.send(result)
                if isinstance(item, Round):
                    sequence.commit(item)
                    sequence.request = None
                    waiting.remove(sequence)
                else:
                    sequence.request = item
        finished = [sequence for sequence in self.running if sequence.finish_reason]
        for sequence in finished:
            self.running.remove(sequence)
            self.free.append(sequence.slot)
        return finished

    def speculates(self, sampler: Sampler, running: int) -> bool:
        """Whether a sequence's next round may draft, with `running` sequences in the batch."""
        return not self.max_speculative_batch or running <= self.max_speculative_batch or sampler.sample

    @staticmethod
    def next_group(waiting: list[SequenceState]) -> list[SequenceState]:
        """The sequences whose requests run together next: head calls of one slice size first, then draft adapter
        calls of one adapter (both let their sequences move on to their next layers), else the layer range that
        starts lowest."""
        heads = [s for s in waiting if isinstance(s.request, Head)]
        if heads:
            return [s for s in heads if s.request.vocab_size == heads[0].request.vocab_size]
        adapting = [s for s in waiting if isinstance(s.request, Adapt)]
        if adapting:
            return [s for s in adapting if s.request.adapter is adapting[0].request.adapter]
        first = min(waiting, key=lambda s: (s.request.start_layer, s.request.end_layer)).request
        return [s for s in waiting if (s.request.start_layer, s.request.end_layer) == (first.start_layer,
                                                                                       first.end_layer)]

    def run(self, group: list[SequenceState]) -> list[torch.Tensor]:
        """The group's requests as few passes as pay (split()); each sequence's part of the result."""
        model, requests = self.model, [sequence.request for sequence in group]
        if isinstance(requests[0], Head):
            sizes = [request.hidden.shape[0] for request in requests]
            hidden = torch.cat([request.hidden for request in requests])
            vocab_size = requests[0].vocab_size
            logits = model.draft_head(hidden, vocab_size) if vocab_size else model.head(hidden)
            return list(logits.split(sizes))
        passes = self.split(requests)
        if len(passes) == 1:
            return self.run_pass(group)
        outputs = {row: out for rows in passes for row, out in zip(rows, self.run_pass([group[row] for row in rows]))}
        return [outputs[row] for row in range(len(group))]

    def split(self, requests: list[Layers | Adapt]) -> list[list[int]]:
        """The rows (indices) of each padded pass: a row near the end of its slot, with no room for the others'
        width of padding, alone; the rest by passes()."""
        lengths = [request.hidden.shape[1] for request in requests]
        apart = [row for row, request in enumerate(requests) if request.start_pos + max(lengths) > self.capacity]
        together = [row for row in range(len(requests)) if row not in apart]
        split = self.passes([lengths[row] for row in together], self.pass_overhead) if together else []
        return [[together[index] for index in rows] for rows in split] + [[row] for row in apart]

    def run_pass(self, group: list[SequenceState]) -> list[torch.Tensor]:
        """The group's layer or adapter requests as one padded pass; each sequence's part of the result."""
        model, requests = self.model, [sequence.request for sequence in group]
        lengths = [request.hidden.shape[1] for request in requests]
        first = requests[0]
        if isinstance(first, Adapt):
            return self.run_adapter(group)
        if self.slots == 1:  # one sequence alone: the scalar path
            return [model.forward_layers(first.hidden, first.start_layer, first.end_layer, first.start_pos, self.cache,
                                         first.positions)]
        positions, starts, rows = self.placement(group, [request.positions for request in requests])
        out = model.forward_layers(self.padded([request.hidden for request in requests]), first.start_layer,
                                   first.end_layer, starts, self.cache, positions, rows=rows)
        return [out[row:row + 1, :length] for row, length in enumerate(lengths)]

    @staticmethod
    def passes(lengths: list[int], overhead: int = PASS_OVERHEAD_ROWS["cpu"]) -> list[list[int]]:
        """The group's rows (their indices) as one padded pass each list: every row is padded to the longest of its
        pass, so a prompt joining the batch would make each one-token row of the others cost a prompt's rows.
        Contiguous runs of the rows sorted by length, the cheapest by the cost of a pass of R padded rows,
        max(2 overhead, overhead + R); ties keep fewer passes."""
        order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
        best, cut = [0] + [None] * len(order), [0] * (len(order) + 1)
        for end in range(1, len(order) + 1):
            for start in range(end):
                padded_rows = (end - start) * lengths[order[start]]
                cost = best[start] + max(2 * overhead, overhead + padded_rows)
                if best[end] is None or cost < best[end]:
                    best[end], cut[end] = cost, start
        passes, end = [], len(order)
        while end:
            passes.append(order[cut[end]:end])
            end = cut[end]
        return passes[::-1]

    @staticmethod
    def padded(parts: list[torch.Tensor]) -> torch.Tensor:
        """Rows [1, T_i, H] as one batch [B, T, H], each padded at its end, past its own positions, where its next
        passes overwrite the padding before any of its queries can see it."""
        batch = parts[0].new_zeros((len(parts), max(part.shape[1] for part in parts), parts[0].shape[2]))
        for row, part in enumerate(parts):
            batch[row, :part.shape[1]] = part[0]
        return batch

    @staticmethod
    def placement(group: list[SequenceState], own_positions: list[list[int] | None]) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where the group's padded rows go: each row's RoPE positions [B, T] (its own, or its slots; the padding
        continues them), first positions [B] and cache rows [B]."""
        lengths = [sequence.request.hidden.shape[1] for sequence in group]
        width = max(lengths)
        positions = torch.empty((len(group), width), dtype=torch.long)
        for row, (sequence, length, own) in enumerate(zip(group, lengths, own_positions)):
            start = sequence.request.start_pos
            own = own or list(range(start, start + length))
            positions[row] = torch.tensor(own + [own[-1] + 1 + i for i in range(width - length)])
        starts = torch.tensor([sequence.request.start_pos for sequence in group])
        return positions, starts, torch.tensor([sequence.slot for sequence in group])

    def run_adapter(self, group: list[SequenceState]) -> list[torch.Tensor]:
        """One draft adapter over the group's rows, in its own cache (a row per slot, made on first use)."""
        model, requests = self.model, [sequence.request for sequence in group]
        adapter = requests[0].adapter
        if id(adapter) not in self.adapter_caches:
            self.adapter_caches[id(adapter)] = adapter.kv_cache(self.capacity, batch_size=self.slots)
        cache = self.adapter_caches[id(adapter)]
        if self.slots == 1:  # one sequence alone: the scalar path
            request = requests[0]
            cos, sin = model.rope(request.start_pos, request.hidden.shape[1], request.hidden.dtype)
            return [adapter(request.hidden, request.context, cos, sin, request.start_pos, cache)]
        hidden = self.padded([request.hidden for request in requests])
        context = self.padded([request.context for request in requests]) if requests[0].context is not None else None
        positions, starts, rows = self.placement(group, [None] * len(group))
        cos, sin = model.rope_at(positions, hidden.dtype)
        out = adapter(hidden, context, cos, sin, starts, cache, rows=rows)
        return [out[row:row + 1, :request.hidden.shape[1]] for row, request in enumerate(requests)]


@torch.inference_mode()
def generate_ids(model: Transformer, prompt_ids: Sequence[int], strategy: Strategy, sampler: Sampler, *,
                 max_new_tokens: int, eos_token_ids: Sequence[int] = (), stop_token_ids: Sequence[int] = (),
                 stop_words: Sequence[str] = (), tokenizer: Tokenizer | None = None,
                 streamer: Streamer | None = None) -> GenerationResult:
    """Decode after `prompt_ids` until a stop condition (one sequence through the engine); the caller has validated
    the inputs."""
    engine = BatchEngine(model, slots=1, capacity=len(prompt_ids) + max_new_tokens)
    device = model.inv_freq.device
    synchronize(device)
    sequence = engine.add(prompt_ids, strategy, sampler, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                          stop_token_ids=stop_token_ids, stop_words=stop_words, tokenizer=tokenizer, streamer=streamer)
    while not engine.step():
        pass
    synchronize(device)
    return sequence.result()
