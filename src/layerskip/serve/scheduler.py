"""The decoding loop: one thread owns the model and a BatchEngine, and runs rounds while anything is running.

Requests (jobs) wait in a queue and join the batch between rounds as slots free up; each leaves when it finishes
or is cancelled (its client went away), so its slot takes the next job before the next round: continuous
batching. The HTTP side never touches the engine: it submits and cancels jobs under a lock and reads each job's
events (text deltas, then one end event) from an asyncio queue the loop feeds through the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Sequence

import torch

from layerskip.generation import BatchEngine, GenerationResult, Sampler, Strategy, TextStreamer
from layerskip.generation.engine import SequenceState
from layerskip.generation.strategies import Round
from layerskip.model import Transformer
from layerskip.serve.metrics import ServerMetrics
from layerskip.serve.protocol import FINISH_REASONS

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Delta:
    """New text of a streamed job: no later token can change it."""
    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    result: GenerationResult


@dataclasses.dataclass(frozen=True)
class Stopped:
    """The job ended without a result: cancelled, the server shutting down, or a failure in decoding."""
    status: int
    message: str


class Refused(Exception):
    """A job the scheduler cannot take: 429 when the queue is full, 503 when the server is shutting down."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Job(TextStreamer):
    """One request in the loop: what to decode, its timings, and the events its HTTP handler awaits.

    As the sequence's streamer it sees each round's committed tokens: it times them and, when streaming, posts
    the text that no later token can cut (TextStreamer.safe_text holds back a partial stop word or character).
    """

    def __init__(self, prompt_ids: Sequence[int], strategy: Strategy, sampler: Sampler, stops: dict[str, Any], *,
                 stream: bool, metrics: ServerMetrics, loop: asyncio.AbstractEventLoop, config: Any = None):
        super().__init__(stops["tokenizer"], stops["stop_words"])
        self.prompt_ids, self.strategy, self.sampler, self.stops = list(prompt_ids), strategy, sampler, stops
        self.config = config  # the resolved GenerationConfig the rest was made from (what other ranks replay)
        self.stream, self.metrics, self.loop = stream, metrics, loop
        self.events: asyncio.Queue[Delta | Finished | Stopped] = asyncio.Queue()
        self.arrived = time.perf_counter()
        self.last_round: float | None = None
        self.cancelled = False

    def post(self, event: Delta | Finished | Stopped) -> None:
        """Hand an event to the handler's event loop (this runs in the decoding thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def on_tokens(self, committed: list[int], step: Round) -> None:
        now = time.perf_counter()
        if self.last_round is None:
            self.metrics.time_to_first_token.observe(now - self.arrived)
        else:
            for _ in committed:
                self.metrics.inter_token_latency.observe((now - self.last_round) / len(committed))
        self.last_round = now
        if self.stream:
            super().on_tokens(committed, step)

    def write(self, text: str) -> None:
        self.post(Delta(text))

    def on_end(self, result: GenerationResult) -> None:
        """The text held back until now (a stop word cut it, or it ended)."""
        rest = (result.text or "")[self.printed:]
        if self.stream and rest:
            self.write(rest)


class Scheduler:
    """Continuous batching of jobs over one BatchEngine of `slots` sequences of up to `capacity` tokens each;
    at most `max_queue` jobs wait beyond a full batch.

    run() is the loop, on the thread that calls it, or on a thread of its own with start(). `layerskip serve` runs
    it on the thread that loaded the model: the CPU kernels' OpenMP threads then serve one thread only, and wake
    as fast as in `generate` (a second thread of parallel work makes libgomp put its idle threads to sleep at once,
    and a decoding step waits on ~150 wake-ups: 20 ms a step instead of 13 here).
    """

    def __init__(self, model: Transformer, metrics: ServerMetrics, *, slots: int, capacity: int, max_queue: int,
                 max_speculative_batch: int = 0, prefill_chunk: int = 0,
                 announce: Callable[..., None] | None = None):
        self.model, self.slots, self.capacity, self.max_queue, self.metrics = model, slots, capacity, max_queue, metrics
        self.max_speculative_batch, self.prefill_chunk = max_speculative_batch, prefill_chunk
        # Under tensor parallelism: each engine call, told to the other ranks first (replicas.py)
        self.announce = announce or (lambda *call: None)
        self.engine = self.new_engine()
        self.changed = threading.Condition(threading.RLock())  # reentrant: leave() ends jobs under it too
        self.waiting: collections.deque[Job] = collections.deque()  # under the lock
        self.active = 0                                              # waiting or running; under the lock
        self.stopping = False
        self.looping = False                                         # run() is in its loop
        self.running: dict[SequenceState, Job] = {}                  # the decoding thread's
        self.thread = threading.Thread(target=self.run, name="layerskip-decoding", daemon=True)
        metrics.watch(queue_depth=lambda: len(self.waiting), running=lambda: len(self.running))

    def new_engine(self) -> BatchEngine:
        return BatchEngine(self.model, slots=self.slots, capacity=self.capacity,
                           max_speculative_batch=self.max_speculative_batch, prefill_chunk=self.prefill_chunk)

    def start(self) -> None:
        self.looping = True  # alive from now, before the thread reaches its loop
        self.thread.start()

    def stop(self) -> None:
        """End the loop after its current round; jobs still waiting or running end as Stopped (503). Waits for a
        loop of start()'s thread to end."""
        with self.changed:
            self.stopping = True
            self.changed.notify()
        if self.thread.is_alive():
            self.thread.join()

    @property
    def alive(self) -> bool:
        return self.looping and not self.stopping

    def submit(self, prompt_ids: Sequence[int], strategy: Strategy, sampler: Sampler, stops: dict[str, Any], *,
               stream: bool, config: Any = None) -> Job:
        """Queue a job (called on the event loop, whose queue its events go to); Refused when `max_queue` jobs
        already wait beyond a full batch, or the loop is stopping. `config`: what the rest was made from."""
        job = Job(prompt_ids, strategy, sampler, stops, stream=stream, metrics=self.metrics,
                  loop=asyncio.get_running_loop(), config=config)
        with self.changed:
            if self.stopping:
                raise Refused(503, "the server is shutting down")
            if self.active >= self.slots + self.max_queue:
                raise Refused(429, f"the server is busy: {self.slots} requests are decoding and {self.max_queue} "
                                "waiting; retry later")
            self.waiting.append(job)
            self.active += 1
            self.changed.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The job's client is gone: the loop drops it before its next round (a no-op once it ended)."""
        with self.changed:
            job.cancelled = True
            self.changed.notify()

    def run(self) -> None:
        """The loop, until stop(). Should it fail outside a round (a bug), it stops taking jobs, ends the ones it
        holds with a 500, and re-raises: /health then says so, and no request waits on a dead loop."""
        self.looping = True
        ending, reason = Stopped(503, "the server is shutting down"), "cancelled"
        try:
            with torch.inference_mode():
                while self.between_rounds():
                    if self.running:
                        self.step()
        except BaseException as error:
            ending, reason = Stopped(500, f"the decoding loop failed: {error}"), "error"
            raise
        finally:
            with self.changed:
                self.stopping = True
                for sequence in list(self.running):
                    self.remove(sequence)
                    self.leave(sequence, ending, reason)
                while self.waiting:
                    self.end(self.waiting.popleft(), ending, reason)
            self.announce("stop")
            self.looping = False

    def between_rounds(self) -> bool:
        """Drop cancelled jobs, then fill free slots from the queue (waiting while there is nothing to do);
        False once the loop is stopping."""
        cancelled = Stopped(499, "cancelled")
        with self.changed:
            self.changed.wait_for(lambda: self.waiting or self.running or self.stopping)
            if self.stopping:
                return False
            for job in [job for job in self.waiting if job.cancelled]:
                self.waiting.remove(job)
                self.end(job, cancelled, "cancelled")
            for sequence, job in list(self.running.items()):
                if job.cancelled:
                    self.remove(sequence)
                    self.leave(sequence, cancelled, "cancelled")
            joining = [self.waiting.popleft() for _ in range(min(len(self.waiting), len(self.engine.free)))]
        for job in joining:
            self.join(job)
        return True

    def remove(self, sequence: SequenceState) -> None:
        self.announce("remove", sequence.slot)
        self.engine.remove(sequence)

    def join(self, job: Job) -> None:
        self.announce("add", job.prompt_ids, job.config)
        try:
            sequence = self.engine.add(job.prompt_ids, job.strategy, job.sampler, streamer=job, **job.stops)
        except Exception as error:  # a bug, not the request's fault: that request fails, the others go on
            log.exception("a request could not join the batch")
            with self.changed:
                self.end(job, Stopped(500, f"decoding failed: {error}"), "error")
            return
        self.running[sequence] = job

    def step(self) -> None:
        """One round of the batch; finished jobs get their results. A failure fails the whole batch (its state is
        unknown), and the loop goes on with a fresh engine."""
        self.announce("step")
        try:
            finished = self.engine.step()
        except Exception as error:
            log.exception("a decoding round failed; its requests fail, the server goes on")
            for sequence in list(self.running):
                self.leave(sequence, Stopped(500, f"decoding failed: {error}"), "error")
            finished = None
        if finished is None:  # past the handler, whose traceback holds the old engine: one KV cache at a time
            self.announce("reset")
            self.engine = None
            self.engine = self.new_engine()
            return
        for sequence in finished:
            job = self.running[sequence]
            try:
                result = sequence.result()
            except Exception as error:  # a bug in one sequence's ending: that request fails, the others go on
                log.exception("a request's result could not be made")
                self.leave(sequence, Stopped(500, f"decoding failed: {error}"), "error")
                continue
            self.metrics.e2e_latency.observe(time.perf_counter() - job.arrived)
            self.leave(sequence, Finished(result), FINISH_REASONS[result.finish_reason])

    def leave(self, sequence: SequenceState, event: Finished | Stopped, reason: str) -> None:
        """A sequence out of the batch: its tokens counted, its job ended (the lock is reentrant)."""
        job = self.running.pop(sequence)
        stats = sequence.stats
        self.metrics.left_batch(prompt_tokens=stats.prompt_tokens, new_tokens=len(sequence.new_tokens),
                                drafted=stats.drafted_tokens, accepted=stats.accepted_drafts)
        with self.changed:
            self.end(job, event, reason)

    def end(self, job: Job, event: Finished | Stopped, reason: str) -> None:
        """Under the lock: the job's last event; its place counts no more against the queue limit."""
        self.active -= 1
        self.metrics.finished.labels(finish_reason=reason).inc()
        job.post(event)
