"""EleutherAI lm-evaluation-harness on our engine: the `layerskip` model for lm-eval, and `layerskip eval`.

Generation tasks decode with the chosen strategy (autoregressive, early exit, self-speculative) under
each request's own stop sequences, token budget and sampling settings. Log-likelihoods come from the
same network: with the autoregressive strategy and an exit layer E they are the early exit's (layers
[0, E), then the shared head), so accuracy on multiple-choice tasks can be measured layer by layer.
Self-speculative output follows the full model, so its log-likelihoods are the full model's.

lm-eval discovers models only through its registry, which importing this module fills:
`layerskip-lm-eval` is lm-eval's own command line with that import done first.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import lm_eval.models  # noqa: F401  (registers lm-eval's models; its registry skips that once not empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from layerskip.api import generate_with_config, strategy_for
from layerskip.errors import LayerSkipError
from layerskip.generation import GenerationConfig, GenerationStats
from layerskip.loading import load
from layerskip.loading.default_model import default_model_name
from layerskip.model import KVCache, ModelConfig

logger = logging.getLogger(__name__)

MAX_TOKENS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
SUPPORTED_GEN_KWARGS = {"until", "do_sample", "temperature", "top_p", "top_k", *MAX_TOKENS_KEYS}
WARM_UP_TOKENS = 8

Scored = tuple[float, bool]                        # log-probability of a continuation, and whether greedy
TokenRequest = tuple[Any, list[int], list[int]]   # (cache key or None, context ids, continuation ids)


@register_model("layerskip")
class LayerSkipLM(TemplateLM):
    """A layerskip model as lm-eval sees it. Model arguments: `pretrained` (folder, .gguf, hub id; default:
    the embedded model), `dtype`, `device`, `quantize`, `draft_adapter`, `compile`, `generation_strategy`, `exit_layer`,
    `num_speculations`, `seed`,
    `batch_size` (continuations scored per pass; `auto`: all of one context), `max_length`, `max_gen_toks`."""

    def __init__(self, pretrained: str | None = None, *, dtype: str | None = None, device: str = "auto",
                 quantize: str = "none", draft_adapter: str | None = None, compile: bool = False,
                 generation_strategy: str | None = None, exit_layer: int = -1, num_speculations: int = -1,
                 seed: int = 42, stop_words: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 ignore_eos: bool = False, batch_size: int | str = 1, max_batch_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, **unknown: Any):
        super().__init__()
        if unknown:
            raise LayerSkipError(f"unknown layerskip model argument(s) {', '.join(sorted(unknown))}; "
                                 f"see `help(layerskip.eval.harness.LayerSkipLM)`")
        self.batch_size = parse_batch_size(batch_size, max_batch_size)
        if device == "cuda:0":  # lm-eval's command line passes this even without a GPU; its hf model falls back too
            device = "auto"
        self.loaded = load(pretrained, dtype=dtype, device=device, quantize=quantize, draft_adapter=draft_adapter,
                           compile=compile)
        if self.loaded.tokenizer is None:
            raise LayerSkipError(f"model '{self.loaded.name}' ships no tokenizer, and lm-eval tasks are text")
        self.tokenizer = self.loaded.tokenizer.hf
        layers = self.loaded.config.num_hidden_layers
        settings = GenerationConfig(generation_strategy=generation_strategy, exit_layer=int(exit_layer),
                                    num_speculations=int(num_speculations), seed=int(seed), stop_words=list(stop_words),
                                    stop_token_ids=list(stop_token_ids), ignore_eos=bool(ignore_eos))
        self.generation = settings = settings.resolved(layers, self.loaded.defaults)
        early_exit = settings.generation_strategy == "autoregressive" and settings.exit_layer != -1
        self.score_depth = settings.exit_layer if early_exit else layers  # layers behind every log-likelihood
        self._max_length = int(max_length or self.loaded.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.arguments = {"pretrained": pretrained or default_model_name(), "dtype": dtype, "device": device,
                          "generation_strategy": settings.generation_strategy, "exit_layer": settings.exit_layer,
                          "num_speculations": settings.num_speculations, "seed": settings.seed, "batch_size": batch_size}
        self.speed: dict[str, GenerationStats] = defaultdict(GenerationStats)
        self.generations: Counter[str] = Counter()
        self.warmed_up = False

    # ---- what lm-eval asks of a model ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.loaded.eos_token_ids[0]

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is replaced by: BOS where the tokenizer has one, else EOS."""
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def tokenizer_name(self) -> str:
        return self.loaded.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids; by default with the tokenizer's special tokens, unless the text already starts with BOS."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in the results file's config: settings, and the speed of each generation task."""
        return {"layerskip": {"model": self.loaded.name, "folder": str(self.loaded.folder),
                              "dtype": str(self.loaded.dtype).removeprefix("torch."), "device": str(self.device),
                              **strategy_for(self.loaded, self.generation).describe(), "loglikelihood_layers": self.score_depth,
                              "speed": self.speed_report()}}

    def speed_report(self) -> dict[str, dict[str, Any]]:
        """Per generation task: summed decoding statistics (tokens/s over all its generations, acceptance rate)."""
        return {task: {"generations": self.generations[task], **stats.as_dict()} for task, stats in self.speed.items()}

    # ---- log-likelihood ------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[Scored]:
        """Score every continuation after its context; requests sharing a context run that context once."""
        fitted = [self.fit_window(context, continuation) for _, context, continuation in requests]
        by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, (context, _) in enumerate(fitted):
            by_context[tuple(context)].append(index)
        scores: list[Scored] = [(0.0, True)] * len(requests)
        for context, indices in tqdm(by_context.items(), disable=disable_tqdm, desc="log-likelihoods"):
            for index, scored in zip(indices, self.score_continuations(list(context), [fitted[i][1] for i in indices])):
                scores[index] = scored
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], scored)
        return scores

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-probability of whole texts, in disjoint windows of the model's context, from the prefix token."""
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for owner, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0], add_special_tokens=False)
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def fit_window(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Drop the oldest context tokens so that context + continuation fits the model's context."""
        keep = self.max_length + 1 - len(continuation)
        if keep < 1:
            raise LayerSkipError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                                 f"{self.max_length}-token context")
        return context[-keep:], continuation

    @torch.inference_mode()
    def score_continuations(self, context: list[int], continuations: list[list[int]]) -> list[Scored]:
        """Log-probability and greediness of each continuation after one shared context.

        The context runs once into a KV cache; the continuations then run from there, `batch_size` at a
        time, right-padded: causal attention keeps every padding position out of every real one.
        """
        model, depth = self.loaded.model, self.score_depth
        longest = max(map(len, continuations))
        if longest == 0:
            return [(0.0, True)] * len(continuations)
        cache = KVCache(model.config, len(context) + longest - 1, dtype=self.loaded.dtype, device=self.device)
        hidden = model.forward_layers(model.embed(self.token_tensor([context])), 0, depth, 0, cache)
        first = model.head(hidden[:, -1])  # [1, vocab]: predicts the first token of every continuation
        scores = []
        step = self.batch_size or len(continuations)
        for start in range(0, len(continuations), step):
            chunk = continuations[start:start + step]
            width = max(map(len, chunk)) - 1
            rest = None
            if width > 0:
                rows = cache if len(chunk) == 1 else repeat_rows(cache, model.config, len(chunk), len(context))
                padded = [c[:-1] + [0] * (width + 1 - len(c)) for c in chunk]
                rest = model.forward(self.token_tensor(padded), exit_layer=depth, start_pos=len(context), cache=rows)
            for row, continuation in enumerate(chunk):
                logits = first if rest is None else torch.cat([first, rest[row]])  # this row's padding included
                scores.append(continuation_score(logits[:len(continuation)], continuation))
        return scores

    def token_tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    # ---- generation ----------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Decode each request with its own settings; repeats of one request draw with different seeds."""
        texts = []
        repeats: Counter[int] = Counter()
        for request in tqdm(requests, disable=disable_tqdm, desc="generations"):
            context, gen_kwargs = request.args
            config = self.request_config(gen_kwargs, repeat=repeats[id(request)])
            repeats[id(request)] += 1
            prompt = self.prompt_ids(context, config.max_steps)
            if not self.warmed_up:  # first-call costs (allocations, kernel selection) stay out of the timings
                generate_with_config(self.loaded, prompt, dataclasses.replace(config, max_steps=WARM_UP_TOKENS))
                self.warmed_up = True
            result = generate_with_config(self.loaded, prompt, config)
            task = request.task_name or "unnamed"
            add_stats(self.speed[task], result.stats)
            self.generations[task] += 1
            texts.append(result.text)
            self.cache_hook.add_partial("generate_until", request.args, result.text)
        return texts

    def request_config(self, gen_kwargs: dict[str, Any], repeat: int = 0) -> GenerationConfig:
        """Our strategy with one request's stop sequences, token budget and sampling (lm-eval's conventions:
        greedy unless `do_sample` or a positive temperature; `do_sample` without a temperature samples at 1)."""
        ignored = sorted(set(gen_kwargs) - SUPPORTED_GEN_KWARGS)
        if ignored:
            warn_once(f"layerskip does not implement generation setting(s) {', '.join(ignored)}: ignored")
        until = gen_kwargs.get("until") or []
        until = [word for word in ([until] if isinstance(until, str) else until) if word]
        max_steps = next((int(gen_kwargs[key]) for key in MAX_TOKENS_KEYS if gen_kwargs.get(key) is not None),
                         self.max_gen_toks)
        temperature = gen_kwargs.get("temperature")
        sample = gen_kwargs.get("do_sample")
        if sample is None:
            sample = temperature is not None and float(temperature) > 0
        config = dataclasses.replace(
            self.generation, max_steps=max_steps, sample=bool(sample),
            temperature=1.0 if temperature is None else float(temperature),
            top_p=float(gen_kwargs.get("top_p") or 1.0), top_k=int(gen_kwargs.get("top_k") or 0),
            seed=self.generation.seed + repeat, stop_words=[*self.generation.stop_words, *until])
        return config.resolved(self.loaded.config.num_hidden_layers, self.loaded.defaults)

    def prompt_ids(self, context: str, max_steps: int) -> list[int]:
        """The context's ids, oldest dropped so that `max_steps` new tokens still fit the model's context."""
        room = self.max_length - max_steps
        if room < 1:
            raise LayerSkipError(f"max_gen_toks {max_steps} leaves no room for a prompt in the model's "
                                 f"{self.max_length}-token context")
        return (self.tok_encode(context) or [self.prefix_token_id])[-room:]


def parse_batch_size(batch_size: int | str, max_batch_size: int | None) -> int | None:
    """Continuations scored per forward pass; None (from `auto`) for all of a context's, up to max_batch_size."""
    if str(batch_size).startswith("auto"):
        return int(max_batch_size) if max_batch_size else None
    try:
        size = int(batch_size)
    except ValueError:
        size = 0
    if size < 1:
        raise LayerSkipError(f"--batch_size must be a positive integer or 'auto', got '{batch_size}'")
    return size


def repeat_rows(cache: KVCache, config: ModelConfig, rows: int, length: int) -> KVCache:
    """A cache of `rows` copies of positions [0, length) of a one-row cache, for continuations run side by side."""
    copy = KVCache(config, cache.capacity, batch_size=rows, dtype=cache.keys.dtype, device=cache.keys.device)
    copy.keys[:, :, :, :length] = cache.keys[:, :, :, :length]
    copy.values[:, :, :, :length] = cache.values[:, :, :, :length]
    return copy


def continuation_score(logits: torch.Tensor, continuation: list[int]) -> Scored:
    """Sum of the continuation's log-probabilities under logits [len(continuation), vocab], and whether each
    of its tokens is the argmax."""
    target = torch.tensor(continuation, device=logits.device)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logits.argmax(dim=-1) == target).all())


def add_stats(total: GenerationStats, stats: GenerationStats) -> None:
    """Accumulate one generation's statistics into a task's."""
    for field in dataclasses.fields(GenerationStats):
        if field.name == "accepted_length_counts":
            counts = total.accepted_length_counts
            counts.extend([0] * (len(stats.accepted_length_counts) - len(counts)))
            for length, count in enumerate(stats.accepted_length_counts):
                counts[length] += count
        else:
            setattr(total, field.name, getattr(total, field.name) + getattr(stats, field.name))


@functools.cache
def warn_once(message: str) -> None:
    logger.warning(message)


# ---- running tasks ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class TaskSelection:
    """Tasks ready to evaluate: lm-eval's task manager and the requested tasks and groups, data loaded."""

    manager: TaskManager
    tasks: list[Any]


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None) -> TaskManager:
    """lm-eval's index of its own tasks plus a local folder's; built once per process (it takes seconds)."""
    return TaskManager(include_path=include_path)


def load_tasks(names: Sequence[str], include_path: str | Path | None = None) -> TaskSelection:
    """Look up tasks by name (or YAML path) and load their data, or raise a LayerSkipError that says why not."""
    if include_path is not None and not Path(include_path).is_dir():
        raise LayerSkipError(f"--include_path {include_path}: no such folder")
    manager = task_manager(str(Path(include_path).resolve()) if include_path is not None else None)
    unknown = [name for name in names if name not in manager.all_tasks and not Path(name).is_file()]
    if unknown:
        close = [match for name in unknown for match in difflib.get_close_matches(name, manager.all_tasks, n=3)]
        raise LayerSkipError(f"unknown task(s) {', '.join(unknown)}"
                             + (f" (close: {', '.join(close)})" if close else "")
                             + "; `lm_eval ls tasks` lists lm-eval's tasks, --include_path adds a folder of your own")
    tasks = []
    for name in names:
        try:
            loaded = manager.load([name])
        except OSError as error:  # datasets raises ConnectionError offline, FileNotFoundError for absent files
            raise LayerSkipError(f"task '{name}': its data could not be loaded ({error}). Offline, a task runs only "
                                 f"when its dataset is in the local datasets cache (run it once online) or in local "
                                 f"files (a task folder given with --include_path)") from None
        # Keep the top of each hierarchy only: lm-eval collects a group's members itself.
        members = {child for children in loaded.get("group_map", {}).values() for child in children}
        tasks += [item for key, item in [*loaded.get("groups", {}).items(), *loaded["tasks"].items()]
                  if key not in members]
    return TaskSelection(manager=manager, tasks=tasks)


def evaluate(lm: LayerSkipLM, selection: TaskSelection, *, limit: float | None = None,
             num_fewshot: int | None = None, gen_kwargs: dict[str, Any] | None = None,
             output_dir: str | Path | None = None, log_samples: bool = False,
             apply_chat_template: bool = False) -> tuple[dict[str, Any], Path | None]:
    """Run lm-eval's evaluation; with `output_dir`, save its results JSON (and samples JSONL) the way lm-eval
    does, under <output_dir>/<model>/. `gen_kwargs` override every generation task's own settings.

    Returns the results (speed statistics under config.layerskip.speed) and the folder written to.
    """
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(output_dir)) if output_dir is not None else None
    results = simple_evaluate(model=lm, model_args=lm.arguments, tasks=selection.tasks,
                              task_manager=selection.manager, num_fewshot=num_fewshot, limit=limit,
                              gen_kwargs=gen_kwargs or None, batch_size=lm.arguments["batch_size"],
                              log_samples=log_samples, evaluation_tracker=tracker,
                              apply_chat_template=apply_chat_template)
    results["config"]["model"] = "layerskip"  # the registered name, which `lm_eval --model layerskip` records
    if tracker is None:
        return results, None
    samples = results.pop("samples", None)
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name, task_samples in (samples or {}).items():
        tracker.save_results_samples(task_name=task_name, samples=task_samples)
    return results, Path(output_dir) / tracker.general_config_tracker.model_name_sanitized


def lm_eval_main() -> None:
    """`layerskip-lm-eval`: lm-eval's command line, with `--model layerskip` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
