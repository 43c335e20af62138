"""`layerskip serve` on loopback, through the real openai client (httpx for raw bodies): greedy outputs equal
generating alone, alone or in a concurrent batch; per-request LayerSkip settings; every refusal in OpenAI's
error shape; cancellation frees the slot; /metrics counts what happened."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import socket
import threading
import time
from typing import Any, Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import layerskip
from conftest import assert_same_greedy_tokens
from layerskip.cli import build_parser, generation_options, main
from layerskip.generation import GenerationConfig, GenerationResult
from layerskip.serve import Server, ServerSettings, create_app

MAX_MODEL_LEN = 256
# The server's generation defaults as `layerskip serve --sample false` parses them.
GREEDY = generation_options(build_parser().parse_args(["serve", "--sample", "false"]))
CHAT = "/v1/chat/completions"


@dataclasses.dataclass
class Live:
    url: str
    app: Any
    server: Server

    @property
    def scheduler(self) -> Any:
        return self.app.state.scheduler

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=120, **kwargs)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}


@contextlib.contextmanager
def live_server(loaded: Any, options: dict[str, Any] = GREEDY, **settings: Any) -> Iterator[Live]:
    """The server in a thread, on a free loopback port, until the block ends; its log goes to pytest's."""
    checked = ServerSettings(**{"max_model_len": MAX_MODEL_LEN, **settings})
    app = create_app(loaded, options, checked)
    sock = socket.create_server(("127.0.0.1", 0))
    server = Server(app, checked, log_level="warning", log_config=None)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield Live(f"http://127.0.0.1:{sock.getsockname()[1]}", app, server)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive() and not app.state.scheduler.thread.is_alive()


@pytest.fixture(scope="module")
def live(default_model: Any) -> Iterator[Live]:
    # Prompts join in chunks of 8 tokens: every equality with generating alone covers chunked prefill too.
    with live_server(default_model, max_batch_size=4, max_queue=8, prefill_chunk=8) as server:
        yield server


def alone(loaded: Any, prompt_ids: list[int], options: dict[str, Any] = GREEDY, **overrides: Any) -> GenerationResult:
    """The reference: the same prompt and settings through generate_with_config, alone."""
    config = GenerationConfig.from_options({**options, **overrides}).resolved(
        loaded.config.num_hidden_layers, loaded.defaults, loaded.config.vocab_size)
    return layerskip.api.generate_with_config(loaded, prompt_ids, config)


def chat_ids(loaded: Any, text: str) -> list[int]:
    return layerskip.encode_prompt(loaded, [{"role": "user", "content": text}], chat=True)


def assert_matches(loaded: Any, prompt_ids: list[int], expected: GenerationResult, body: dict[str, Any]) -> None:
    """A response body decodes what generating alone does: tokens, text, finish reason, usage."""
    report, choice = body["layerskip"], body["choices"][0]
    assert_same_greedy_tokens(loaded, prompt_ids, expected.token_ids, report["token_ids"])
    if report["token_ids"] == expected.token_ids:
        assert (choice["message"]["content"] if "message" in choice else choice["text"]) == expected.text
        assert choice["finish_reason"] == ("length" if expected.finish_reason == "max_steps" else "stop")
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": len(report["token_ids"]),
                             "total_tokens": len(prompt_ids) + len(report["token_ids"])}
    assert report["settings"] == expected.settings


@contextlib.contextmanager
def rounds_held(server: Live) -> Iterator[threading.Event]:
    """The decoding loop waits before each round until the event is set (so the test, not the clock, decides
    when requests finish)."""
    scheduler, go = server.scheduler, threading.Event()
    step = scheduler.engine.step
    scheduler.engine.step = lambda: go.wait() and step()
    try:
        yield go
    finally:
        go.set()


def wait_for(condition: Any, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what} after {seconds} s"
        time.sleep(0.05)


def test_chat_and_text_completions_decode_as_generating_alone(live, default_model):
    client = live.client()
    chat = client.chat.completions.create(model=default_model.name, max_tokens=12,
                                          messages=[{"role": "user", "content": "Name three colours."}])
    ids = chat_ids(default_model, "Name three colours.")
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert_matches(default_model, ids, alone(default_model, ids, max_steps=12), chat.to_dict())

    text = client.completions.create(model=default_model.name, prompt="The capital of France is", max_tokens=8)
    ids = layerskip.encode_prompt(default_model, "The capital of France is", chat=False)
    expected = alone(default_model, ids, max_steps=8)
    assert text.object == "text_completion"
    assert_matches(default_model, ids, expected, text.to_dict())
    as_ids = client.completions.create(model=default_model.name, prompt=ids, max_tokens=8)
    assert as_ids.choices[0].text == text.choices[0].text and as_ids.usage == text.usage


def test_streams_carry_the_same_text_then_usage_and_done(live, default_model):
    client = live.client()
    messages = [{"role": "user", "content": "Say hello."}]
    whole = client.chat.completions.create(model=default_model.name, messages=messages, max_tokens=10)
    chunks = list(client.chat.completions.create(model=default_model.name, messages=messages, max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}))
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    last, usage = chunks[-2], chunks[-1]
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert [c.choices[0].finish_reason for c in chunks[:-2]] == [None] * (len(chunks) - 2)
    assert last.to_dict()["layerskip"]["settings"] == whole.to_dict()["layerskip"]["settings"]
    assert usage.choices == [] and usage.usage == whole.usage

    prompt = "Once upon a time"
    text = client.completions.create(model=default_model.name, prompt=prompt, max_tokens=8)
    with httpx.stream("POST", live.url + "/v1/completions", timeout=120,
                      json={"prompt": prompt, "max_tokens": 8, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    bodies = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {body["object"] for body in bodies} == {"text_completion"} and "usage" not in bodies[-1]
    assert "".join(body["choices"][0]["text"] for body in bodies) == text.choices[0].text


@pytest.mark.parametrize("prompt,finish_reason", [("Hello", "stop_word"), ("Say hello.", "max_steps")])
def test_stop_sequences_cut_the_text_streamed_or_not(live, default_model, prompt, finish_reason):
    """A stop string ends decoding and is cut off; the stream holds back what could be the start of one, and
    sends it once no stop string can follow."""
    stop = ["assist", "never appears"]
    expected = alone(default_model, chat_ids(default_model, prompt), max_steps=16, stop_words=stop)
    assert expected.finish_reason == finish_reason  # the case is what it means to be
    client = live.client()
    whole = client.chat.completions.create(model=default_model.name, messages=message(prompt), max_tokens=16,
                                           stop=stop)
    chunks = list(client.chat.completions.create(model=default_model.name, messages=message(prompt), max_tokens=16,
                                                 stop=stop, stream=True))
    assert whole.choices[0].message.content == expected.text == "".join(c.choices[0].delta.content or ""
                                                                         for c in chunks)
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == \
        ("stop" if finish_reason == "stop_word" else "length")


def test_concurrent_requests_decode_as_each_alone(live, default_model):
    """Requests in one batch, with different strategies and lengths, each as generating it alone."""
    cases = [("What is a cache?", {}), ("Name a prime number.", {"generation_strategy": "autoregressive"}),
             ("Write a haiku.", {"generation_strategy": "self_speculative", "exit_layer": 6, "num_speculations": 3}),
             ("Count to five.", {"generation_strategy": "autoregressive", "max_steps": 6})]

    def ask(case: tuple[str, dict[str, Any]]) -> dict[str, Any]:
        prompt, settings = case
        extra = {key: value for key, value in settings.items() if key != "max_steps"}
        return live.client().chat.completions.create(
            model=default_model.name, messages=[{"role": "user", "content": prompt}],
            max_tokens=settings.get("max_steps", 12), extra_body=extra).to_dict()

    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool, rounds_held(live) as go:
        futures = [pool.submit(ask, case) for case in cases]
        scheduler = live.scheduler  # all four in one batch: the first joined it, the others wait to join together
        wait_for(lambda: len(scheduler.waiting) + len(scheduler.running) == len(cases), "every request to arrive")
        go.set()
        bodies = [future.result() for future in futures]
    for (prompt, settings), body in zip(cases, bodies):
        ids = chat_ids(default_model, prompt)
        assert_matches(default_model, ids, alone(default_model, ids, **{"max_steps": 12, **settings}), body)


def test_per_request_strategy_settings_are_honoured(live, default_model):
    messages = [{"role": "user", "content": "Explain recursion briefly."}]

    def ask(**settings: Any) -> dict[str, Any]:
        return live.client().chat.completions.create(model=default_model.name, messages=messages, max_tokens=12,
                                                     extra_body=settings).to_dict()

    plain = ask(generation_strategy="autoregressive")
    drafted = ask(generation_strategy="self_speculative", exit_layer=8, num_speculations=3, draft_confidence=0.2)
    assert plain["layerskip"]["settings"] == {"generation_strategy": "autoregressive"}
    assert plain["layerskip"]["acceptance_rate"] is None and plain["layerskip"]["drafted_tokens"] == 0
    settings = drafted["layerskip"]["settings"]
    assert (settings["generation_strategy"], settings["exit_layer"], settings["num_speculations"],
            settings["draft_confidence"]) == ("self_speculative", 8, 3, 0.2)
    assert drafted["layerskip"]["drafted_tokens"] > 0 and 0 <= drafted["layerskip"]["acceptance_rate"] <= 1
    ids = chat_ids(default_model, messages[0]["content"])
    assert_same_greedy_tokens(default_model, ids, plain["layerskip"]["token_ids"], drafted["layerskip"]["token_ids"])
    assert drafted["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]


def message(text: str = "Hi") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


LONG_PROMPT = "word " * 200

BAD_REQUESTS = [  # (endpoint, body (bytes: sent raw), status, param, code, words the message must hold)
    (CHAT, b'{"messages": [', 400, None, None, ["JSON"]),
    (CHAT, b"[1, 2]", 400, None, None, ["JSON object"]),
    (CHAT, {}, 400, "messages", None, ["required"]),
    (CHAT, {"messages": message(), "temperature": "hot"}, 400, "temperature", None, ["number"]),
    (CHAT, {"messages": message(), "top_p": 1.5}, 400, "top_p", None, ["1"]),
    (CHAT, {"messages": message(), "max_tokens": 0}, 400, "max_tokens", None, ["1"]),
    (CHAT, {"messages": message(), "stream": "yes"}, 400, "stream", None, []),
    (CHAT, {"messages": message(), "n": 2}, 400, "n", None, ["one choice"]),
    (CHAT, {"messages": message(), "logprobs": True}, 400, "logprobs", None, ["not supported"]),
    (CHAT, {"messages": message(), "tools": [{"type": "function"}]}, 400, "tools", None, ["not supported"]),
    (CHAT, {"messages": message(), "colour": "blue"}, 400, "colour", None, ["unknown field"]),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages.0.content", None,
     ["text"]),
    (CHAT, {"messages": [{"role": "robot", "content": "beep"}]}, 400, "messages.0.role", None, ["robot"]),
    (CHAT, {"messages": message(), "stream_options": {"include_usage": True}}, 400, None, None, ["stream"]),
    (CHAT, {"messages": message(), "generation_strategy": "beam"}, 400, "generation_strategy", None, ["beam"]),
    (CHAT, {"messages": message(), "generation_strategy": "self_speculative", "exit_layer": 99}, 400,
     "exit_layer", None, ["99"]),
    (CHAT, {"messages": message(LONG_PROMPT), "max_tokens": 100}, 400, "messages", "context_length_exceeded",
     ["100", str(MAX_MODEL_LEN)]),
    ("/v1/completions", {"prompt": ["two", "prompts"]}, 400, "prompt", None, ["one prompt"]),
    ("/v1/completions", {"prompt": [1, 10 ** 9]}, 400, None, None, ["vocabulary"]),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo", None, ["not supported"]),
    (CHAT, {"model": "gpt-4", "messages": message()}, 404, "model", "model_not_found", ["gpt-4"]),
    ("/v1/nowhere", {}, 404, None, None, []),
    (CHAT, b"[" + b"1," * (1 << 20) + b"1]", 413, None, "request_too_large", ["limit"]),
]


@pytest.mark.parametrize("path,body,status,param,code,words", BAD_REQUESTS)
def test_refusals_in_openais_error_shape(live, default_model, path, body, status, param, code, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(live.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    for word in words:
        assert word in error["message"]
    if code == "context_length_exceeded":  # it names the prompt's length too
        assert str(len(chat_ids(default_model, LONG_PROMPT))) in error["message"]


def test_bad_requests_leave_the_running_batch_alone(live, default_model):
    """Refusals between the rounds of a stream: the stream decodes as alone, the server serves on."""
    ids = chat_ids(default_model, "Tell me about owls.")
    stream = live.client().chat.completions.create(model=default_model.name, messages=message("Tell me about owls."),
                                                   max_tokens=16, stream=True)
    chunks = [next(stream), next(stream)]  # the role, and the first text: it is decoding
    for path, body, status, *_ in BAD_REQUESTS[:8]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        assert httpx.post(live.url + path, content=raw, headers={"content-type": "application/json"},
                          timeout=60).status_code == status
    chunks += list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == alone(default_model, ids, max_steps=16).text
    assert live.client().models.list().data[0].id == default_model.name


def test_models_and_health(live, default_model):
    models = live.client().models.list().data
    assert [model.id for model in models] == [default_model.name] and models[0].max_model_len == MAX_MODEL_LEN
    health = httpx.get(live.url + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_metrics_count_requests_tokens_and_drafts(live, default_model):
    before = live.metrics()
    client = live.client()
    bodies = [client.chat.completions.create(model=default_model.name, messages=message("Hello there"),
                                             max_tokens=8, extra_body={"generation_strategy": "self_speculative"}),
              client.completions.create(model=default_model.name, prompt="One, two,", max_tokens=8,
                                        extra_body={"generation_strategy": "autoregressive"})]
    assert live.post(CHAT, {"messages": message(), "n": 3}).status_code == 400
    after = live.metrics()

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("layerskip_requests_total", endpoint=CHAT, status="200") == 1
    assert moved("layerskip_requests_total", endpoint="/v1/completions", status="200") == 1
    assert moved("layerskip_requests_total", endpoint=CHAT, status="400") == 1
    reports = [body.to_dict()["layerskip"] for body in bodies]
    assert moved("layerskip_prompt_tokens_total") == sum(body.usage.prompt_tokens for body in bodies)
    assert moved("layerskip_generation_tokens_total") == sum(body.usage.completion_tokens for body in bodies)
    assert moved("layerskip_drafted_tokens_total") == sum(report["drafted_tokens"] for report in reports) > 0
    assert moved("layerskip_accepted_tokens_total") == sum(report["accepted_drafts"] for report in reports)
    for histogram in ("time_to_first_token", "e2e_request_latency"):
        assert moved(f"layerskip_{histogram}_seconds_count") == 2
    # once per token after each request's first round: all but the first token autoregressively, fewer drafting
    completions = [body.usage.completion_tokens for body in bodies]
    assert completions[1] - 1 <= moved("layerskip_inter_token_latency_seconds_count") <= sum(completions) - 2
    assert moved("layerskip_requests_finished_total", finish_reason="length") + moved(
        "layerskip_requests_finished_total", finish_reason="stop") == 2
    assert after[("layerskip_running_requests", ())] == after[("layerskip_queue_depth", ())] == 0
    assert 0 < after[("layerskip_acceptance_rate", ())] <= 1


def test_api_key_is_required_on_the_api_when_set(default_model):
    with live_server(default_model, api_key="sesame", max_batch_size=1) as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = server.post(CHAT, {"messages": message()}, headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert server.client("sesame").completions.create(model=default_model.name, prompt="Hi", max_tokens=2).usage
        assert httpx.get(server.url + "/health").status_code == 200  # probes need no key
        assert server.metrics()[("layerskip_requests_total", (("endpoint", CHAT), ("status", "401")))] == 2


def test_a_full_queue_is_429_with_retry_after(default_model):
    with live_server(default_model, max_batch_size=1, max_queue=1) as server, rounds_held(server) as go:
        body = {"messages": message(), "max_tokens": 4, "stream": True}
        with httpx.stream("POST", server.url + CHAT, json=body, timeout=60) as first, \
                httpx.stream("POST", server.url + CHAT, json=body, timeout=60) as second:
            assert first.status_code == second.status_code == 200  # one in the batch, one waiting
            refused = server.post(CHAT, {"messages": message(), "max_tokens": 4})
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "queue_full"
            go.set()
            for stream in (first, second):
                assert [line for line in stream.iter_lines() if line][-1] == "data: [DONE]"
        assert server.post(CHAT, {"messages": message(), "max_tokens": 2}).status_code == 200


def test_a_closed_stream_is_cancelled_and_frees_its_slot(default_model):
    """One slot; a stream that would run to the context closes after its first text: the slot takes the next."""
    with live_server(default_model, {**GREEDY, "ignore_eos": True}, max_batch_size=1, max_queue=0) as server:
        stream = server.client().chat.completions.create(model=default_model.name, messages=message("Tell a story."),
                                                         stream=True)
        assert next(stream).choices[0].delta.role == "assistant" and next(stream).choices[0].delta.content
        stream.close()
        cancelled = ("layerskip_requests_finished_total", (("finish_reason", "cancelled"),))
        wait_for(lambda: server.metrics().get(cancelled) == 1, "the cancellation")
        metrics = server.metrics()
        assert metrics[("layerskip_running_requests", ())] == 0 and not server.scheduler.engine.running
        assert metrics[("layerskip_generation_tokens_total", ())] < MAX_MODEL_LEN - 40  # it did not run to the end
        reply = server.client().chat.completions.create(model=default_model.name, messages=message(), max_tokens=3)
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


def test_a_failed_round_fails_its_requests_and_the_server_goes_on(default_model):
    with live_server(default_model, max_batch_size=2) as server:
        def broken() -> None:
            raise RuntimeError("a bug in a round")

        server.scheduler.engine.step = broken  # the scheduler replaces a failed engine by a fresh one
        failed = server.post(CHAT, {"messages": message(), "max_tokens": 4})
        assert failed.status_code == 500 and "a bug in a round" in failed.json()["error"]["message"]
        assert server.post(CHAT, {"messages": message(), "max_tokens": 4}).status_code == 200
        assert server.metrics()[("layerskip_requests_finished_total", (("finish_reason", "error"),))] == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failed_decoding_loop_ends_its_requests_and_says_so(default_model):
    """A bug outside a round kills the loop: its request gets a 500, /health a 503, and new requests are refused
    (503) instead of waiting on a dead loop."""
    with live_server(default_model, max_batch_size=2) as server:
        scheduler = server.scheduler
        between_rounds = scheduler.between_rounds

        def broken() -> bool:
            if scheduler.running:
                raise RuntimeError("a bug between rounds")
            return between_rounds()

        scheduler.between_rounds = broken
        failed = server.post(CHAT, {"messages": message(), "max_tokens": 30})
        assert failed.status_code == 500 and "a bug between rounds" in failed.json()["error"]["message"]
        wait_for(lambda: not scheduler.looping, "the loop to end")
        assert httpx.get(server.url + "/health", timeout=30).status_code == 503
        refused = server.post(CHAT, {"messages": message(), "max_tokens": 4})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"


def test_shutdown_ends_a_stream_that_outlives_the_grace_period(default_model, caplog):
    """should_exit (what Ctrl-C and SIGTERM set) with a stream that cannot finish: after the grace period the
    decoding loop ends it with a 503 error event and [DONE], the server stops, and nothing logs an error."""
    with live_server(default_model, shutdown_grace_seconds=0.5) as server, rounds_held(server) as go:
        body = {"messages": message(), "max_tokens": 8, "stream": True}
        with httpx.stream("POST", server.url + CHAT, json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert json.loads(next(lines).removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
            server.server.should_exit = True
            wait_for(lambda: server.scheduler.stopping, "the grace period to pass")
            go.set()  # the held round ends; the loop, stopping, ends the request instead of decoding on
            events = [line for line in lines if line]
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert "shutting down" in error["message"] and error["type"] == "server_error" and events[-1] == "data: [DONE]"
    scheduler, registry = server.scheduler, server.app.state.metrics.registry
    assert not scheduler.thread.is_alive() and not scheduler.running and not scheduler.waiting
    assert registry.get_sample_value("layerskip_requests_finished_total", {"finish_reason": "cancelled"}) == 1
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("flag,value,message", [("--max_batch_size", "0", "--max_batch_size must be at least 1"),
                                                ("--max_queue", "-1", "--max_queue must be at least 0"),
                                                ("--port", "70000", "--port must be in [0, 65535]"),
                                                ("--prefill_chunk", "-4", "--prefill_chunk must be >= 0 (0: a prompt in one pass)"),
                                                ("--max_speculative_batch", "-1",
                                                 "--max_speculative_batch must be >= 0 (0: no limit)")])
def test_serve_flags_out_of_range(capsys, flag, value, message):
    assert main(["serve", flag, value]) == 2
    assert capsys.readouterr().err.strip() == f"layerskip: error: {message}, got {value}"


def test_serve_decodes_on_the_calling_thread_and_stops_on_a_signal(default_model, monkeypatch):
    """serve() as the command runs it: HTTP on a thread, the decoding loop on this (the main) thread; SIGINT ends
    both cleanly and puts the process's own handler back."""
    import os
    import signal

    from layerskip.serve import serve
    from layerskip.serve.app import Service
    from layerskip.serve.scheduler import Scheduler

    decoding_threads, http_threads = set(), set()
    step, complete = Scheduler.step, Service.complete

    def recorded(self: Scheduler) -> None:
        decoding_threads.add(threading.current_thread())
        step(self)

    async def handled(self: Service, *args: Any) -> Any:
        http_threads.add(threading.current_thread())
        return await complete(self, *args)

    monkeypatch.setattr(Scheduler, "step", recorded)
    monkeypatch.setattr(Service, "complete", handled)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    replies: list[Any] = []

    def client() -> None:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.05)
        replies.append(httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=120))
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    caller = threading.Thread(target=client, daemon=True)
    caller.start()
    serve(default_model, GREEDY, ServerSettings(port=port, max_model_len=MAX_MODEL_LEN))
    caller.join(timeout=60)
    [response] = replies
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
    assert decoding_threads == {threading.main_thread()} and threading.main_thread() not in http_threads
    assert http_threads and signal.getsignal(signal.SIGINT) is before


def test_a_conversation_the_chat_template_refuses_is_a_400(live, default_model, monkeypatch):
    from jinja2 import TemplateError

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    monkeypatch.setattr(default_model.tokenizer.hf, "apply_chat_template", refuse)
    response = live.post(CHAT, {"messages": message(), "max_tokens": 4})
    error = response.json()["error"]
    assert response.status_code == 400 and "roles must alternate" in error["message"]
    assert error["type"] == "invalid_request_error"
