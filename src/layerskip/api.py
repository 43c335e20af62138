"""The Python API: `load` a model, then `generate` from a prompt, with the CLI's options as keywords."""

from __future__ import annotations

from typing import Any, Sequence

from layerskip.errors import LayerSkipError
from layerskip.generation import GenerationConfig, GenerationResult, Streamer, generate_ids
from layerskip.loading import LoadedModel, load

Messages = list[dict[str, str]]


def encode_prompt(loaded: LoadedModel, prompt: str | Messages | None, *, prompt_ids: Sequence[int] | None = None,
                  chat: bool | None = None) -> list[int]:
    """Token ids for a prompt: given ids, a plain string, or a conversation (chat template by default for chat models)."""
    if prompt_ids is not None:
        ids = list(prompt_ids)
        bad = [i for i in ids if not 0 <= i < loaded.config.vocab_size]
        if bad:
            raise LayerSkipError(f"prompt token id {bad[0]} is outside the vocabulary [0, {loaded.config.vocab_size})")
    else:
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()) or (not isinstance(prompt, str) and not prompt):
            raise LayerSkipError("the prompt is empty")
        if loaded.tokenizer is None:
            raise LayerSkipError(f"model '{loaded.name}' ships no tokenizer: give token ids with --prompt_ids")
        use_chat = loaded.tokenizer.has_chat_template if chat is None else chat
        if use_chat and not loaded.tokenizer.has_chat_template:
            raise LayerSkipError(f"model '{loaded.name}' has no chat template: use --no-chat")
        if isinstance(prompt, str):
            ids = loaded.tokenizer.encode_chat([{"role": "user", "content": prompt}]) if use_chat else loaded.tokenizer.encode(prompt)
        else:
            ids = loaded.tokenizer.encode_chat(prompt)
    if not ids:
        raise LayerSkipError("the prompt is empty")
    context = loaded.config.max_position_embeddings
    if len(ids) >= context:
        raise LayerSkipError(f"the prompt is {len(ids)} tokens, but the model's context is {context}: shorten it")
    return ids


def generate(loaded: LoadedModel, prompt: str | Messages | None = None, *, prompt_ids: Sequence[int] | None = None,
             chat: bool | None = None, streamer: Streamer | None = None, **options: Any) -> GenerationResult:
    """Generate a continuation. `options` are GenerationConfig fields (generation_strategy, exit_layer, ...)."""
    config = GenerationConfig.from_options(options).resolved(loaded.config.num_hidden_layers, loaded.defaults)
    return generate_with_config(loaded, encode_prompt(loaded, prompt, prompt_ids=prompt_ids, chat=chat), config,
                                streamer=streamer)


def generate_with_config(loaded: LoadedModel, prompt_ids: list[int], config: GenerationConfig, *,
                         streamer: Streamer | None = None) -> GenerationResult:
    """Generate from token ids with a resolved config (the CLI and benchmarks call this directly)."""
    if config.stop_words and loaded.tokenizer is None:
        raise LayerSkipError("--stop_words needs a tokenizer, and this model ships none: use --stop_token_ids")
    return generate_ids(loaded.model, prompt_ids, config.strategy(), config.sampler(loaded.device),
                        max_new_tokens=config.max_steps,
                        eos_token_ids=() if config.ignore_eos else loaded.eos_token_ids,
                        stop_token_ids=config.stop_token_ids, stop_words=config.stop_words,
                        tokenizer=loaded.tokenizer, streamer=streamer)


__all__ = ["encode_prompt", "generate", "generate_with_config", "load"]
