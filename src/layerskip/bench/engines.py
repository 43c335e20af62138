"""Engines a benchmark can drive on the same prompts: ours, and Hugging Face transformers `generate()`.

The HF engine is the peer baseline: autoregressive, or self-speculative through its
`assistant_early_exit=E, num_assistant_tokens=k` (which shares weights but keeps a second KV cache).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Protocol

import torch

from layerskip.api import generate_batch
from layerskip.generation import GenerationConfig
from layerskip.generation.engine import synchronize
from layerskip.loading import LoadedModel

ENGINES = ("layerskip", "hf")


@dataclasses.dataclass
class Outcome:
    token_ids: list[int]
    text: str
    stats: dict[str, Any]  # at least new_tokens and seconds (generation only, device synchronised)


class Engine(Protocol):
    name: str
    batches: bool  # decodes a list of prompts together (its rows share their time), else one after another

    def generate(self, prompts: list[list[int]]) -> list[Outcome]:
        """One outcome per prompt, decoded together where the engine can batch (each `seconds` is that prompt's
        own latency)."""


class LayerSkipEngine:
    name, batches = "layerskip", True

    def __init__(self, loaded: LoadedModel, config: GenerationConfig, max_speculative_batch: int | None = None):
        self.loaded, self.config, self.max_speculative_batch = loaded, config, max_speculative_batch

    def generate(self, prompts: list[list[int]]) -> list[Outcome]:
        results = generate_batch(self.loaded, prompts, self.config, batch_size=len(prompts),
                                 max_speculative_batch=self.max_speculative_batch)
        return [Outcome(result.token_ids, result.text or "", result.stats.as_dict()) for result in results]


class HFEngine:
    name, batches = "hf", False

    def __init__(self, loaded: LoadedModel, config: GenerationConfig):
        from transformers import AutoModelForCausalLM

        self.loaded, self.config = loaded, config
        model = AutoModelForCausalLM.from_pretrained(str(loaded.folder), dtype=loaded.dtype)
        if loaded.adapter is not None:  # the same merged weights as ours (our adapters are in peft's format)
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(loaded.adapter)).merge_and_unload()
        self.model = model.to(loaded.device).eval()

    def generate(self, prompts: list[list[int]]) -> list[Outcome]:
        """One prompt at a time: assisted generation refuses batches."""
        return [self.generate_one(prompt_ids) for prompt_ids in prompts]

    def generate_one(self, prompt_ids: list[int]) -> Outcome:
        config, loaded = self.config, self.loaded
        options: dict[str, Any] = dict(max_new_tokens=config.max_steps, do_sample=config.sample,
                                       pad_token_id=(loaded.eos_token_ids or [0])[0])
        if config.sample:
            options.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or None)
        if config.ignore_eos:
            options.update(min_new_tokens=config.max_steps, eos_token_id=None)
        else:
            options["eos_token_id"] = loaded.eos_token_ids or None
        if config.stop_words:
            # As a criterion rather than `stop_strings`, which transformers also hands to the early-exit
            # assistant's own generate() without the tokenizer it needs (a ValueError there).
            from transformers import StoppingCriteriaList, StopStringCriteria

            options["stopping_criteria"] = StoppingCriteriaList([StopStringCriteria(loaded.tokenizer.hf,
                                                                                    config.stop_words)])
        if config.generation_strategy == "self_speculative":
            options.update(assistant_early_exit=config.exit_layer, num_assistant_tokens=config.num_speculations,
                           num_assistant_tokens_schedule="constant")
        inputs = torch.tensor([prompt_ids], device=loaded.device)
        torch.manual_seed(config.seed)
        synchronize(loaded.device)
        start = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), **options)
        synchronize(loaded.device)
        seconds = time.perf_counter() - start
        new = output[0, len(prompt_ids):].tolist()
        text = loaded.tokenizer.decode(new) if loaded.tokenizer is not None else ""
        if config.stop_words:
            from layerskip.generation.stopping import cut_at_stop_words

            text, _ = cut_at_stop_words(text, config.stop_words)
        return Outcome(new, text, {"new_tokens": len(new), "seconds": seconds})


def make_engine(name: str, loaded: LoadedModel, config: GenerationConfig,
                max_speculative_batch: int | None = None) -> Engine:
    return HFEngine(loaded, config) if name == "hf" else LayerSkipEngine(loaded, config, max_speculative_batch)
