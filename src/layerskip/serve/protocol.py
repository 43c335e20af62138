"""The OpenAI wire format: request bodies, the error shape, and response and stream-chunk bodies.

Request bodies are strict (a number where a string belongs is refused, never coerced) and closed (an unknown
field is refused by name), as OpenAI's own API does. Fields of OpenAI's API that this server does not implement
are accepted only at their neutral value, so a client that sends `n: 1` or `logprobs: false` works, and one that
relies on `n: 2` or `tools` hears so instead of getting silently different behaviour.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from layerskip.errors import LayerSkipError
from layerskip.generation import GenerationResult

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

# The engine's finish reasons as OpenAI's: ended by the model or a stop condition, or cut by a length limit.
FINISH_REASONS = {"eos": "stop", "stop_token": "stop", "stop_word": "stop", "max_steps": "length",
                  "context_length": "length"}

# Generation options whose request field is named otherwise (LayerSkipError messages name the CLI flags).
OPTION_FIELDS = {"max_steps": "max_tokens", "stop_words": "stop"}


class APIError(Exception):
    """A request the server refuses or could not complete, as `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    @classmethod
    def from_layerskip(cls, error: LayerSkipError) -> "APIError":
        """A settings mistake the engine found (`--exit_layer 40 is outside ...`), in the request's own terms."""
        flag = re.search(r"--(\w+)", str(error))
        message = re.sub(r"--(\w+)", lambda match: OPTION_FIELDS.get(match[1], match[1]), str(error))
        return cls(400, message, param=OPTION_FIELDS.get(flag[1], flag[1]) if flag else None)


class StrictBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(StrictBody):
    include_usage: bool = False


class ChatMessage(StrictBody):
    role: str
    content: str
    name: str | None = None  # accepted, not used: chat templates have no place for it

    @field_validator("role")
    @classmethod
    def known_role(cls, role: str) -> str:
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"role '{role}' is not supported: use system, user or assistant")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def text_of_parts(cls, content: Any) -> Any:
        """Content as a string, or as a list of text parts (joined); other parts (images, audio) are refused."""
        if not isinstance(content, list):
            return content
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("content parts must be {'type': 'text', 'text': '...'}: only text is supported")
            texts.append(part["text"])
        return "".join(texts)


# Fields of OpenAI's API this server does not implement: the values that mean "not used", and why.
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((1,), "this server returns one choice per request"),
    "best_of": ((1,), "this server returns one choice per request"),
    "logprobs": ((False,), "log probabilities are not returned"),
    "top_logprobs": ((0,), "log probabilities are not returned"),
    "echo": ((False,), "the prompt is not echoed"),
    "suffix": (("",), "insertion is not supported"),
    "logit_bias": (({},), "logit biases are not supported"),
    "presence_penalty": ((0,), "penalties are not supported"),
    "frequency_penalty": ((0,), "penalties are not supported"),
    "tools": (([],), "tool calls are not supported"),
    "tool_choice": (("none",), "tool calls are not supported"),
    "functions": (([],), "function calls are not supported"),
    "function_call": (("none",), "function calls are not supported"),
    "parallel_tool_calls": ((False, True), "tool calls are not supported"),
    "response_format": (({"type": "text"},), "only plain text responses are supported"),
}


class GenerationRequest(StrictBody):
    """What chat and text completions share: the model, sampling, stops, streaming and LayerSkip's settings."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # 0: off
    seed: int | None = None
    stop: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, not used
    # LayerSkip's settings, per request (the openai client sends them as extra_body)
    generation_strategy: str | None = None
    exit_layer: int | None = None
    num_speculations: int | None = None
    draft_vocab_size: int | None = None
    draft_confidence: float | None = None
    draft_candidates: int | None = None
    # OpenAI's, accepted only at their neutral values (UNSUPPORTED)
    n: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def stop_list(cls, stop: Any) -> Any:
        return [stop] if isinstance(stop, str) else stop

    @field_validator("stop")
    @classmethod
    def no_empty_stop(cls, stop: list[str] | None) -> list[str] | None:
        if stop is not None and any(not word for word in stop):
            raise ValueError("stop sequences must not be empty")
        return stop

    @field_validator(*UNSUPPORTED, check_fields=False)
    @classmethod
    def neutral(cls, value: Any, info: ValidationInfo) -> Any:
        allowed, reason = UNSUPPORTED[info.field_name]
        if value is not None and value not in allowed:
            raise ValueError(f"{value!r:.40} is not supported: {reason}")
        return value

    @model_validator(mode="after")
    def stream_options_with_stream(self) -> "GenerationRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def generation_options(self, defaults: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
        """GenerationConfig options: the server's defaults, overridden by what this request sets."""
        options = {**defaults, "max_steps": max_new_tokens}
        if self.temperature is not None:
            options.update(sample=self.temperature > 0, temperature=self.temperature)
        if self.stop is not None:
            options["stop_words"] = self.stop
        for name in ("top_p", "top_k", "seed", "generation_strategy", "exit_layer", "num_speculations",
                     "draft_vocab_size", "draft_confidence", "draft_candidates"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        return options


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": message.role, "content": message.content} for message in self.messages]


class CompletionRequest(GenerationRequest):
    prompt: Any  # a string or a list of token ids
    best_of: Any = None
    echo: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and all(isinstance(token, int) and not isinstance(token, bool) for token in prompt):
            return prompt
        raise ValueError("prompt must be a string or a list of token ids (one prompt per request)")


def usage(result: GenerationResult) -> dict[str, int]:
    prompt, completion = result.stats.prompt_tokens, len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def decoding_report(result: GenerationResult) -> dict[str, Any]:
    """The `layerskip` field: the request's decoding settings and statistics."""
    stats = result.stats
    return {"settings": result.settings, "finish_reason": result.finish_reason,
            "acceptance_rate": stats.acceptance_rate, "mean_tokens_per_round": stats.mean_tokens_per_round,
            "drafted_tokens": stats.drafted_tokens, "accepted_drafts": stats.accepted_drafts, "rounds": stats.rounds}


class Reply:
    """The bodies of one request's answer, whole or as stream chunks, for chat or text completions."""

    def __init__(self, *, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def envelope(self, *, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def body(self, result: GenerationResult) -> dict[str, Any]:
        content = {"message": {"role": "assistant", "content": result.text}} if self.chat else {"text": result.text}
        choice = {"index": 0, **content, "finish_reason": FINISH_REASONS[result.finish_reason], "logprobs": None}
        return {**self.envelope(chunk=False), "choices": [choice], "usage": usage(result),
                "layerskip": {**decoding_report(result), "token_ids": result.token_ids}}

    def chunk(self, text: str | None = None, *, role: bool = False, result: GenerationResult | None = None
              ) -> dict[str, Any]:
        """A stream chunk: new text (chat's first chunk also names the role); with `result`, the last one, which
        carries the finish reason and the decoding report."""
        if self.chat:
            content = {"delta": {**({"role": "assistant"} if role else {}), **({"content": text} if text is not None
                                                                                else {})}}
        else:
            content = {"text": text or ""}
        finish_reason = FINISH_REASONS[result.finish_reason] if result is not None else None
        body = {**self.envelope(chunk=True), "choices": [{"index": 0, **content, "finish_reason": finish_reason,
                                                          "logprobs": None}]}
        if result is not None:
            body["layerskip"] = decoding_report(result)
        return body

    def usage_chunk(self, result: GenerationResult) -> dict[str, Any]:
        return {**self.envelope(chunk=True), "choices": [], "usage": usage(result)}
