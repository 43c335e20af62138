"""The Python API: `load` a model, then `generate` from a prompt, with the CLI's options as keywords."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from layerskip.errors import LayerSkipError
from layerskip.generation import BatchEngine, GenerationConfig, GenerationResult, Strategy, Streamer, generate_ids
from layerskip.generation.config import check_batching, check_token_ids
from layerskip.loading import LoadedModel, load

Messages = list[dict[str, str]]


def encode_prompt(loaded: LoadedModel, prompt: str | Messages | None, *, prompt_ids: Sequence[int] | None = None,
                  chat: bool | None = None) -> list[int]:
    """Token ids for a prompt: given ids, a plain string, or a conversation (chat template by default for chat models)."""
    if prompt_ids is not None:
        ids = check_token_ids(prompt_ids, loaded.config.vocab_size, "prompt token id")
    else:
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()) or (not isinstance(prompt, str) and not prompt):
            raise LayerSkipError("the prompt is empty")
        if loaded.tokenizer is None:
            if loaded.tokenizer_error:
                raise LayerSkipError(f"{loaded.tokenizer_error}; give token ids with --prompt_ids instead")
            raise LayerSkipError(f"model '{loaded.name}' ships no tokenizer: give token ids with --prompt_ids")
        use_chat = loaded.tokenizer.has_chat_template if chat is None else chat
        if use_chat and not loaded.tokenizer.has_chat_template:
            raise LayerSkipError(f"model '{loaded.name}' has no chat template: use --no-chat")
        if isinstance(prompt, str):
            ids = loaded.tokenizer.encode_chat([{"role": "user", "content": prompt}]) if use_chat else loaded.tokenizer.encode(prompt)
        else:
            ids = loaded.tokenizer.encode_chat(prompt)
        too_large = [token for token in ids if not 0 <= token < loaded.config.vocab_size]
        if too_large:  # a tokenizer that does not belong to these weights
            raise LayerSkipError(f"the tokenizer of model '{loaded.name}' produced token id {too_large[0]}, outside "
                                 f"the model's vocabulary [0, {loaded.config.vocab_size}): they do not belong together")
    if not ids:
        raise LayerSkipError("the prompt is empty")
    context = loaded.config.max_position_embeddings
    if len(ids) >= context:
        raise LayerSkipError(f"the prompt is {len(ids)} tokens, but the model's context is {context}: shorten it")
    return ids


def generate(loaded: LoadedModel, prompt: str | Messages | list[str | Messages] | None = None, *,
             prompt_ids: Sequence[int] | None = None, chat: bool | None = None, streamer: Streamer | None = None,
             batch_size: int = 8, max_speculative_batch: int | None = None,
             **options: Any) -> GenerationResult | list[GenerationResult]:
    """Generate a continuation. `options` are GenerationConfig fields (generation_strategy, exit_layer, ...).

    A list of prompts (strings or conversations) decodes as a batch of up to `batch_size` at once and returns one
    result per prompt, each what the prompt alone would give (the same seed, its own generator).
    """
    config = GenerationConfig.from_options(options).resolved(loaded.config.num_hidden_layers, loaded.defaults,
                                                             loaded.config.vocab_size)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], dict):
        return generate_batch(loaded, [encode_prompt(loaded, text, chat=chat) for text in prompt], config,
                              batch_size=batch_size, max_speculative_batch=max_speculative_batch)
    return generate_with_config(loaded, encode_prompt(loaded, prompt, prompt_ids=prompt_ids, chat=chat), config,
                                streamer=streamer)


def strategy_for(loaded: LoadedModel, config: GenerationConfig) -> Strategy:
    """A resolved config's strategy on this model, its draft adapter included."""
    name = loaded.draft_adapter_path.name if loaded.draft_adapter_path is not None else ""
    return config.strategy(loaded.draft_adapter, name)


def stop_settings(loaded: LoadedModel, config: GenerationConfig) -> dict[str, Any]:
    """The stop conditions of a resolved config, checked against the model."""
    check_token_ids(config.stop_token_ids, loaded.config.vocab_size, "--stop_token_ids")
    if config.stop_words and loaded.tokenizer is None:
        raise LayerSkipError("--stop_words needs a tokenizer, and this model ships none: use --stop_token_ids")
    return dict(max_new_tokens=config.max_steps, eos_token_ids=() if config.ignore_eos else loaded.eos_token_ids,
                stop_token_ids=config.stop_token_ids, stop_words=config.stop_words, tokenizer=loaded.tokenizer)


def generate_with_config(loaded: LoadedModel, prompt_ids: list[int], config: GenerationConfig, *,
                         streamer: Streamer | None = None) -> GenerationResult:
    """Generate from token ids with a resolved config (the CLI and benchmarks call this directly)."""
    return generate_ids(loaded.model, prompt_ids, strategy_for(loaded, config), config.sampler(loaded.device),
                        streamer=streamer, **stop_settings(loaded, config))


def speculative_batch_limit(loaded: LoadedModel, max_speculative_batch: int | None) -> int:
    """BatchEngine's max_speculative_batch: the given one, else the model's stored one (measured by
    benchmarks/bench_batch.py on its host), else 0 (greedy sequences draft in batches of any size)."""
    limit = int(loaded.defaults.get("max_speculative_batch", 0)) if max_speculative_batch is None \
        else max_speculative_batch
    check_batching(max_speculative_batch=limit)
    return limit


@torch.inference_mode()
def generate_batch(loaded: LoadedModel, prompts: list[list[int]], config: GenerationConfig, *, batch_size: int = 8,
                   max_speculative_batch: int | None = None,
                   on_result: Callable[[int, GenerationResult], None] | None = None) -> list[GenerationResult]:
    """One result per prompt (token ids), decoding up to `batch_size` at once; a finished prompt's slot takes the
    next, and `on_result(index, result)` hears of each as it finishes. Each prompt samples from its own generator
    seeded with config.seed, as it would alone. `max_speculative_batch`: see BatchEngine (None: the model's)."""
    check_batching(batch_size)
    stops, strategy = stop_settings(loaded, config), strategy_for(loaded, config)
    engine = BatchEngine(loaded.model, slots=min(batch_size, len(prompts)),
                         capacity=max(map(len, prompts)) + config.max_steps,
                         max_speculative_batch=speculative_batch_limit(loaded, max_speculative_batch))
    results = {}
    for index, sequence in engine.each(range(len(prompts)), lambda index: engine.add(
            prompts[index], strategy, config.sampler(loaded.device), **stops)):
        results[index] = sequence.result()
        if on_result is not None:
            on_result(index, results[index])
    return [results[index] for index in range(len(prompts))]


__all__ = ["encode_prompt", "generate", "generate_batch", "generate_with_config", "load", "speculative_batch_limit",
           "strategy_for"]
