"""The server's Prometheus metrics, in a registry of its own (two servers in one process never share counts)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; CPU decoding under load reaches tens of seconds to the first token, GPU decoding milliseconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("layerskip_requests", "API requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=registry)
        self.finished = Counter("layerskip_requests_finished", "Requests that left the decoding loop, by how: stop, "
                                "length, cancelled (client gone or server shutting down) or error",
                                ["finish_reason"], registry=registry)
        self.prompt_tokens = Counter("layerskip_prompt_tokens", "Prompt tokens of decoded requests", registry=registry)
        self.generation_tokens = Counter("layerskip_generation_tokens", "Tokens generated", registry=registry)
        self.time_to_first_token = Histogram("layerskip_time_to_first_token_seconds",
                                             "From a request's arrival to its first generated token",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram("layerskip_inter_token_latency_seconds",
                                             "Time between a request's rounds over the tokens the round committed, "
                                             "once per token", buckets=TOKEN_LATENCY_BUCKETS, registry=registry)
        self.e2e_latency = Histogram("layerskip_e2e_request_latency_seconds",
                                     "From a request's arrival to its last token", buckets=LATENCY_BUCKETS,
                                     registry=registry)
        self.queue_depth = Gauge("layerskip_queue_depth", "Requests waiting for a slot in the batch", registry=registry)
        self.running = Gauge("layerskip_running_requests", "Requests in the running batch", registry=registry)
        self.drafted = Counter("layerskip_drafted_tokens", "Draft tokens proposed by self-speculative decoding",
                               registry=registry)
        self.accepted = Counter("layerskip_accepted_tokens", "Draft tokens the full model accepted", registry=registry)
        self.acceptance_rate = Gauge("layerskip_acceptance_rate", "Accepted over drafted tokens since the start "
                                     "(0 before any draft)", registry=registry)
        self.drafted_total = self.accepted_total = 0

    def watch(self, *, queue_depth: Callable[[], int], running: Callable[[], int]) -> None:
        """Read the gauges of the decoding loop's state when scraped."""
        self.queue_depth.set_function(queue_depth)
        self.running.set_function(running)

    def left_batch(self, *, prompt_tokens: int, new_tokens: int, drafted: int, accepted: int) -> None:
        """A sequence's tokens, once, when it leaves the batch (finished, cancelled or failed)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(new_tokens)
        self.drafted.inc(drafted)
        self.accepted.inc(accepted)
        self.drafted_total += drafted
        self.accepted_total += accepted
        if self.drafted_total:
            self.acceptance_rate.set(self.accepted_total / self.drafted_total)

    def render(self) -> bytes:
        return generate_latest(self.registry)
