"""`layerskip` command line. Flag names follow the reference LayerSkip tool so its users need not relearn them.

A user mistake prints one line, `layerskip: error: ...`, and exits with status 2.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from layerskip.errors import LayerSkipError


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise LayerSkipError(f"{message} (see `{self.prog} --help`)")


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def parse_int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def unescape(text: str) -> str:
    """Let users type stop words such as '\\n\\n' on a shell line."""
    return codecs.decode(text, "unicode_escape") if "\\" in text else text


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint folder, adapter folder, .gguf file or hub id (default: the embedded "
                             "smollm2-135m, or smollm2-135m-layerskip once the package ships its adapter)")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default) or float16")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--quantize", default="none",
                        help="weight format for decoding, applied at load, LM head included: none, bf16, int8 "
                             "(Q8_0) or int4 (Q4_1); a GGUF file's own blocks of that format are used as they are")
    parser.add_argument("--compile", action="store_true",
                        help="decoding passes as compiled static-shape graphs (torch.compile; CUDA graphs on a GPU); "
                             "on the CPU kept only if faster here, and a line says which")
    parser.add_argument("--draft_adapter", default=None,
                        help="a draft adapter folder (drafts read the exit through it; output is the model's own), "
                             "or none (default: the one the model names; the embedded smollm2-135m ships one)")


def load_model(args: argparse.Namespace) -> Any:
    """The model of the model flags (add_model_arguments)."""
    import layerskip

    loaded = layerskip.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                            draft_adapter=args.draft_adapter, compile=args.compile)
    if loaded.compile_report is not None:
        print(f"layerskip: --compile {loaded.compile_report.describe()}", file=sys.stderr)
    return loaded


def add_generation_arguments(parser: argparse.ArgumentParser, *, grid: bool = False) -> None:
    """Generation flags; with `grid`, --exit_layers/--num_speculations/--draft_candidates take lists or ranges and
    --draft_confidence a list (for sweeps)."""
    group = parser.add_argument_group("generation")
    if grid:
        group.add_argument("--exit_layers", required=True, help="'4,8,12' or 'start:stop:step'")
        group.add_argument("--num_speculations", required=True, help="'2,4,6' or 'start:stop:step'")
    else:
        group.add_argument("--generation_strategy", default=None,
                           help="autoregressive or self_speculative (default: the model's stored default, else "
                                "autoregressive)")
        group.add_argument("--exit_layer", type=int, default=-1,
                           help="layers used by the draft (self_speculative) or by early-exit inference (autoregressive)")
        group.add_argument("--num_speculations", type=int, default=-1, help="draft tokens per self-speculative round")
    group.add_argument("--draft_vocab_size", type=int, default=-1,
                       help="drafts score only this many of the model's most frequent tokens (0: the whole "
                            "vocabulary; default: the model's stored setting); verification always scores all")
    group.add_argument("--draft_confidence", type=str if grid else float, default="-1" if grid else -1,
                       help="stop a round's drafting after a draft whose probability is below this (0: always draft "
                            "--num_speculations; default: the model's stored setting)"
                            + ("; a list '0,0.5' sweeps over them" if grid else ""))
    group.add_argument("--draft_candidates", type=str if grid else int, default="-1" if grid else -1,
                       help="candidates verified at each round's last draft position, in one pass (1: a plain "
                            "chain of drafts; default: the model's stored setting)"
                            + ("; a list '1,2,4' sweeps over them" if grid else ""))
    group.add_argument("--max_steps", type=int, default=512, help="maximum new tokens")
    group.add_argument("--sample", type=parse_bool, nargs="?", const=True, default=True,
                       help="sample (default) or, with --sample false, decode greedily")
    group.add_argument("--temperature", type=float, default=0.6)
    group.add_argument("--top_k", type=int, default=0, help="0 disables top-k")
    group.add_argument("--top_p", type=float, default=0.9, help="1.0 disables nucleus sampling")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--stop_words", nargs="*", type=unescape, default=[],
                       help="stop when the text contains one of these (backslash escapes allowed: '\\n\\n')")
    group.add_argument("--stop_token_ids", type=parse_int_list, default=[], help="comma-separated ids that end decoding")
    group.add_argument("--ignore_eos", action="store_true", help="keep decoding past end-of-sequence tokens")


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", required=True, help="cnn_dm_summarization, xsum_summarization, cnn_dm_lm, "
                       "human_eval, top_v2 or custom_jsonl")
    group.add_argument("--data_path", default=None, help="a local .jsonl file, or a folder with test.jsonl/train.jsonl")
    group.add_argument("--prompt_field", default="prompt", help="custom_jsonl: the prompt field")
    group.add_argument("--response_field", default="response", help="custom_jsonl: the reference field")
    group.add_argument("--num_samples", type=int, default=None, help="a deterministic subset of this size (by --seed)")
    group.add_argument("--n_shot", type=int, default=0, help="exemplars from the train split before each prompt")
    group.add_argument("--template", default=None, help="wrap each prompt: a string containing {prompt}")
    group.add_argument("--chat", action=argparse.BooleanOptionalAction, default=False,
                       help="wrap prompts in the model's chat template")
    group.add_argument("--output_dir", default="./logs", help="where reports are written")


def load_dataset_samples(args: argparse.Namespace) -> list[Any]:
    from layerskip.eval.datasets import load_samples

    if args.num_samples is not None and args.num_samples < 1:
        raise LayerSkipError(f"--num_samples must be at least 1, got {args.num_samples}")
    return load_samples(args.dataset, data_path=args.data_path, num_samples=args.num_samples, seed=args.seed,
                        n_shot=args.n_shot, template=args.template, prompt_field=args.prompt_field,
                        response_field=args.response_field)


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    names = ("generation_strategy", "exit_layer", "num_speculations", "draft_vocab_size", "draft_confidence",
             "draft_candidates", "max_steps", "sample", "temperature", "top_k", "top_p", "seed", "stop_words", "stop_token_ids",
             "ignore_eos")
    sweep = hasattr(args, "exit_layers")
    if sweep:  # the grid flags are not single settings
        names = tuple(name for name in names if name not in ("generation_strategy", "exit_layer", "num_speculations",
                                                             "draft_confidence", "draft_candidates"))
    options = {name: getattr(args, name) for name in names}
    if sweep:  # its points are self-speculative: resolve the draft settings as such, not as the model's stored
        options["generation_strategy"] = "self_speculative"  # strategy (autoregressive drops --draft_vocab_size)
    return options


MAX_SPECULATIVE_BATCH_HELP = ("greedy self-speculative sequences draft only while at most this many decode together, "
                              "else take one token a round (the same output; 0: always draft; default: the model's "
                              "stored value, measured by benchmarks/bench_batch.py)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="layerskip", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    generate = commands.add_parser("generate", help="generate text (one-shot, from stdin, or interactive)",
                                   description="Generate with autoregressive, early-exit or self-speculative decoding.")
    add_model_arguments(generate)
    add_generation_arguments(generate)
    prompt = generate.add_argument_group("prompt and output")
    prompt.add_argument("--prompt", default=None, help="the prompt; without it, stdin is read (or a chat starts on a terminal)")
    prompt.add_argument("--prompt_ids", type=parse_int_list, default=None, help="token ids instead of a prompt: 1,17,42")
    prompt.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap the prompt in the model's chat template (default: when the model has one)")
    prompt.add_argument("--streamer", choices=("text", "speculative", "none"), default="text",
                        help="print text as it is accepted; 'speculative' also shows drafts and which were accepted")
    prompt.add_argument("--output", choices=("text", "json", "jsonl"), default="text",
                        help="'json' prints one object with text, token_ids and stats (no streaming); 'jsonl' (with "
                             "--prompts_file) one such object per prompt, with its index, as each finishes")
    prompt.add_argument("--prompts_file", default=None,
                        help="a JSONL file of prompts ('prompt': a string, or 'messages': a conversation), decoded "
                             "as a batch; the aggregate tokens/s goes to stderr")
    prompt.add_argument("--batch_size", type=int, default=8, help="with --prompts_file: sequences decoded at once")
    prompt.add_argument("--max_speculative_batch", type=int, default=None, help=MAX_SPECULATIVE_BATCH_HELP)
    prompt.add_argument("--compare_autoregressive", action="store_true",
                        help="also decode the prompt autoregressively (same model and sampling) and print the speedup "
                             "and, greedy, whether the outputs are identical")
    generate.set_defaults(run=run_generate)

    correctness = dataset_command(
        commands, "correctness", "check that greedy self-speculative decoding equals autoregressive decoding",
        "Greedy autoregressive and self-speculative decoding on the same samples; exit status 1 "
        "when any sample differs. Writes <output_dir>/correctness.jsonl as it goes and correctness.json.",
        bench=False)
    correctness.add_argument("--resume", action="store_true", help="continue an interrupted run in the same --output_dir")
    correctness.add_argument("--batch_size", type=int, default=1,
                             help="self-speculative samples decoded together (the autoregressive reference decodes "
                                  "one at a time), so a batch's rows are checked against each prompt alone")
    correctness.set_defaults(run=run_correctness, generation_strategy="self_speculative", max_steps=128)

    benchmark = dataset_command(
        commands, "benchmark", "run a dataset through one configuration: quality and speed",
        "Quality (ROUGE, BLEU, exact match, HumanEval pass@1) and speed of one generation configuration "
        "on a dataset. Writes <output_dir>/benchmark/<run>/records.jsonl as it goes and summary.json.")
    benchmark.add_argument("--compare", choices=("hf",), default=None,
                           help="also run the same configuration through HF transformers and print the ratios")
    benchmark.add_argument("--batch_size", type=int, default=1,
                           help="samples decoded together (the aggregate tokens/s counts a batch's time once; HF "
                                "decodes them one at a time)")
    benchmark.add_argument("--max_speculative_batch", type=int, default=None, help=MAX_SPECULATIVE_BATCH_HELP)
    benchmark.set_defaults(run=run_benchmark_command)

    sweep = dataset_command(
        commands, "sweep", "grid of exit layers x speculations, with an autoregressive baseline, CSV and heatmap",
        "Benchmark every (exit_layer, num_speculations) of a grid on the same samples. Writes "
        "<output_dir>/sweep/sweep.csv row by row (rerun to resume) and sweep_heatmap.png.", grid=True)
    sweep.set_defaults(run=run_sweep_command)
    sweep.add_argument("--save_defaults", default=None, metavar="FOLDER",
                       help="store the best point as the model's decoding defaults in FOLDER/layerskip.json (the "
                            "model's or adapter's folder); self_speculative becomes the default strategy if it won")
    sweep.add_argument("--min_speedup", type=float, default=1.05,
                       help="with --save_defaults: the speedup over autoregressive decoding the best point needs "
                            "to become the default strategy (a margin over timing noise)")

    evaluation = commands.add_parser(
        "eval", help="EleutherAI lm-evaluation-harness tasks: accuracy per exit layer, speed per strategy",
        description="Run lm-evaluation-harness tasks on this engine. Generation tasks decode with the chosen strategy "
        "under each task's own stop sequences, token budget and sampling; --sample, --temperature, --top_p, --top_k "
        "and --max_steps, when given, override those for every task. Log-likelihoods come from the early exit with "
        "--exit_layer (autoregressive), else from the full model. Writes <output_dir>/eval/<model>/results_<date>.json "
        "(speed statistics under config.layerskip.speed) and, with --log_samples, samples_<task>_<date>.jsonl.")
    add_model_arguments(evaluation)
    add_generation_arguments(evaluation)
    evaluation.set_defaults(run=run_eval, sample=None, temperature=None, top_k=None, top_p=None, max_steps=None)
    tasks = evaluation.add_argument_group("tasks and output")
    tasks.add_argument("--tasks", nargs="+", required=True,
                       help="lm-eval task, group or tag names, or task YAML files (space- or comma-separated)")
    tasks.add_argument("--include_path", default=None, help="a folder of your own task YAMLs (and their local data)")
    tasks.add_argument("--limit", type=float, default=None, help="examples per task: a count, or a fraction below 1")
    tasks.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    tasks.add_argument("--batch_size", default="1",
                       help="continuations scored per forward pass, or 'auto' for all of one context "
                            "(generation decodes one sequence at a time)")
    tasks.add_argument("--apply_chat_template", action="store_true", help="render prompts with the model's chat template")
    tasks.add_argument("--log_samples", action="store_true", help="also write each sample's prompt, response and metrics")
    tasks.add_argument("--output_dir", default="./logs", help="where results are written")

    exits = commands.add_parser(
        "exits", help="per-layer early-exit quality and simulated self-speculation on a text set: table and plot",
        description="For every exit layer l: top-1 agreement with the last layer and early-exit perplexity on the "
                    "text, and the acceptance that greedy self-speculation with E = l would see on the model's own "
                    "continuations, with an estimated speedup. Writes <output_dir>/exits/exits.csv and exits.png; "
                    "measurements are kept per model, so rerunning continues an interrupted run.")
    add_model_arguments(exits)
    exits.add_argument("--compare", default=None, help="a second model (e.g. before training), drawn dashed on the same plot")
    data = exits.add_argument_group("data")
    data.add_argument("--data_path", action="extend", nargs="+", required=True,
                      help="text files, folders (their .txt/.md/.py/... files), glob patterns or .jsonl files; "
                           "repeatable, or comma-separated")
    data.add_argument("--text_field", default="text", help="JSONL: the field with the text (or a list of token ids)")
    data.add_argument("--seq_len", type=int, default=256, help="tokens per chunk of the text set")
    data.add_argument("--num_samples", type=int, default=None, help="a deterministic subset of this many chunks (by --seed)")
    data.add_argument("--seed", type=int, default=42)
    data.add_argument("--output_dir", default="./logs", help="where reports are written")
    speculation = exits.add_argument_group("self-speculation")
    speculation.add_argument("--gen_tokens", type=int, default=64,
                             help="greedy tokens generated after each chunk, on which acceptance is measured (0: skip)")
    speculation.add_argument("--num_speculations", type=int, default=4,
                             help="drafts per round k for the simulated acceptance")
    exits.set_defaults(run=run_exits)

    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (chat and text completions, streaming, metrics)",
        description="Serve the model over OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models) plus "
                    "/health and /metrics (Prometheus), decoding every request in one continuous batch. The "
                    "generation flags are the defaults a request's own fields override.")
    add_model_arguments(serve)
    add_generation_arguments(serve)
    server = serve.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--max_batch_size", type=int, default=8, help="requests decoding together")
    server.add_argument("--max_queue", type=int, default=64,
                        help="requests waiting beyond a full batch; more are refused with 429")
    server.add_argument("--max_model_len", type=int, default=None,
                        help="prompt + new tokens of one request (default: 2048, or the model's context if shorter)")
    server.add_argument("--api_key", default=None, help="require 'Authorization: Bearer <key>' on /v1")
    server.add_argument("--max_speculative_batch", type=int, default=None, help=MAX_SPECULATIVE_BATCH_HELP)
    server.add_argument("--prefill_chunk", type=int, default=256,
                        help="a longer prompt joins the batch in rounds of this many tokens, so the others decode on "
                             "meanwhile (0: in one pass)")
    serve.set_defaults(run=run_serve)

    from layerskip.training.command import add_training_commands  # cheap: torch loads only when a command runs

    add_training_commands(commands)  # `layerskip train --config r.yaml [key=value ...]`, `layerskip merge-lora`
    return parser


def dataset_command(commands: Any, name: str, summary: str, description: str, *, grid: bool = False,
                    bench: bool = True) -> argparse.ArgumentParser:
    """A subcommand that runs generation over a dataset: model, generation, data (and benchmark) flags."""
    parser = commands.add_parser(name, help=summary, description=description)
    add_model_arguments(parser)
    add_generation_arguments(parser, grid=grid)
    add_dataset_arguments(parser)
    if bench:
        add_bench_arguments(parser)
    return parser


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("benchmark")
    group.add_argument("--engine", choices=("layerskip", "hf"), default="layerskip",
                       help="ours, or HF transformers generate() as the peer baseline")
    group.add_argument("--execute_code", action="store_true",
                       help="human_eval: run each problem's tests on the generation (executes generated code)")
    group.add_argument("--resume", action="store_true", help="continue an interrupted run in the same --output_dir")


def format_stats(stats: dict[str, Any]) -> str:
    line = (f"{stats['new_tokens']} tokens in {stats['seconds']:.2f} s: {stats['tokens_per_second']:.1f} tokens/s, "
            f"{1000 * stats['time_per_token']:.1f} ms/token")
    if stats["acceptance_rate"] is not None:
        line += (f"; acceptance {100 * stats['acceptance_rate']:.1f}%, {stats['mean_tokens_per_round']:.2f} tokens/round, "
                 f"accepted lengths {stats['accepted_length_counts']}, "
                 f"{stats['draft_forwards']} draft / {stats['verify_forwards']} verify forwards")
    return line


def compare_with(plain: Any, result: Any, sampled: bool) -> dict[str, Any]:
    """The speedup of `result` over autoregressive decoding of the same prompt, and (greedy) whether they match."""
    speed, plain_speed = result.stats.tokens_per_second, plain.stats.tokens_per_second
    return {"autoregressive_tokens_per_second": plain_speed, "tokens_per_second": speed,
            "speedup": speed / plain_speed if plain_speed else None,
            "identical": None if sampled else result.token_ids == plain.token_ids}


def format_comparison(comparison: dict[str, Any]) -> str:
    identical = {None: "sampled: same distribution, other draws", True: "identical output",
                 False: "output DIFFERS"}[comparison["identical"]]
    return (f"autoregressive {comparison['autoregressive_tokens_per_second']:.1f} tokens/s -> "
            f"{comparison['tokens_per_second']:.1f} tokens/s: {comparison['speedup']:.2f}x, {identical}")


def check_batching(args: argparse.Namespace) -> None:
    """A command's batch flags, before the model loads."""
    from layerskip.generation.config import check_batching as check

    check(args.batch_size, getattr(args, "max_speculative_batch", None))


def run_generate(args: argparse.Namespace) -> int:
    import layerskip
    from layerskip.generation import GenerationConfig, SpeculativeStreamer, TextStreamer

    check_batching(args)
    if args.prompts_file is None and args.max_speculative_batch is not None:
        raise LayerSkipError("--max_speculative_batch applies to batches: give --prompts_file")
    loaded = load_model(args)
    config = GenerationConfig.from_options(generation_options(args)).resolved(loaded.config.num_hidden_layers,
                                                                             loaded.defaults, loaded.config.vocab_size)

    def streamer_for() -> Any:
        if args.output == "json" or args.streamer == "none" or loaded.tokenizer is None:
            return None
        kind = SpeculativeStreamer if args.streamer == "speculative" else TextStreamer
        return kind(loaded.tokenizer, config.stop_words)

    plain = dataclasses.replace(config, generation_strategy="autoregressive", exit_layer=-1)
    compare = args.compare_autoregressive and config.generation_strategy != "autoregressive"

    def run_once(prompt: Any, prompt_ids: Sequence[int] | None) -> Any:
        ids = layerskip.encode_prompt(loaded, prompt, prompt_ids=prompt_ids, chat=args.chat)
        if compare:  # both strategies warm (first-call allocations) before either is timed
            for warm in (config, plain):
                layerskip.api.generate_with_config(loaded, ids, dataclasses.replace(warm, max_steps=4))
        streamer = streamer_for()
        result = layerskip.api.generate_with_config(loaded, ids, config, streamer=streamer)
        comparison = compare_with(layerskip.api.generate_with_config(loaded, ids, plain), result, config.sample) \
            if compare else None
        if args.output == "json":
            output = result.as_dict()
            output["settings"].update(loaded.runtime_settings())
            print(json.dumps({"model": loaded.name, **output, **({"comparison": comparison} if compare else {})},
                             ensure_ascii=False))
        else:
            if streamer is None:
                print(result.text if result.text is not None else ",".join(map(str, result.token_ids)))
            print(format_stats(result.stats.as_dict()), file=sys.stderr)
            if comparison is not None:
                print(format_comparison(comparison), file=sys.stderr)
        return result

    if args.prompts_file is not None:
        run_prompts_file(loaded, config, args)
    elif args.prompt_ids is not None or args.prompt is not None:
        run_once(args.prompt, args.prompt_ids)
    elif not sys.stdin.isatty():
        run_once(sys.stdin.read(), None)
    else:
        interactive(loaded, run_once, args.chat)
    return 0


def read_prompts_file(path: Path) -> list[Any]:
    """The prompts of a JSONL file: each line's 'prompt' (a string) or 'messages' (a conversation)."""
    from layerskip.jsonl import read_objects

    if not path.is_file():
        raise LayerSkipError(f"--prompts_file {path} does not exist")
    prompts = []
    for number, record in read_objects(path):
        prompt = record.get("prompt", record.get("messages"))
        if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
            raise LayerSkipError(f"{path}:{number} has no 'prompt' string or 'messages' list")
        prompts.append(prompt)
    if not prompts:
        raise LayerSkipError(f"--prompts_file {path} holds no prompts")
    return prompts


def run_prompts_file(loaded: Any, config: Any, args: argparse.Namespace) -> None:
    """Every prompt of --prompts_file through one batch (--batch_size at once): each result as it finishes."""
    import time

    import layerskip

    prompts = read_prompts_file(Path(args.prompts_file))
    ids = [layerskip.encode_prompt(loaded, prompt, chat=args.chat) for prompt in prompts]

    def show(index: int, result: Any) -> None:
        if args.output == "text":
            print(f"[{index}] " + (result.text if result.text is not None else ",".join(map(str, result.token_ids))))
        else:
            print(json.dumps({"index": index, "model": loaded.name, **result.as_dict()}, ensure_ascii=False), flush=True)

    start = time.perf_counter()
    results = layerskip.api.generate_batch(loaded, ids, config, batch_size=args.batch_size,
                                           max_speculative_batch=args.max_speculative_batch, on_result=show)
    seconds = time.perf_counter() - start
    tokens = sum(result.stats.new_tokens for result in results)
    print(f"{len(results)} prompts, {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s in all, "
          f"batch size {min(args.batch_size, len(results))}", file=sys.stderr)


def run_correctness(args: argparse.Namespace) -> int:
    from layerskip.eval.correctness import compare
    from layerskip.generation import GenerationConfig

    options = {**generation_options(args), "generation_strategy": "self_speculative"}
    check_batching(args)
    samples = load_dataset_samples(args)
    loaded = load_model(args)
    config = GenerationConfig.from_options(options).resolved(loaded.config.num_hidden_layers, loaded.defaults,
                                                             loaded.config.vocab_size)
    output = Path(args.output_dir)
    report = {"model": loaded.name, "dataset": args.dataset,
              **compare(loaded, samples, config, chat=args.chat, records_path=output / "correctness.jsonl",
                        resume=args.resume, batch_size=args.batch_size)}
    (output / "correctness.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    for record in report["results"]:
        if not record["identical"]:
            print(f"{record['id']}: differs at token {record['first_difference']}: "
                  f"autoregressive {record['autoregressive'][:60]!r} vs self-speculative "
                  f"{record['self_speculative'][:60]!r}")
    print(f"{report['errors']} of {report['samples']} samples differ ({report['error_percentage']:.1f}%); "
          f"report: {output / 'correctness.json'}")
    return 1 if report["errors"] else 0


def prepare_benchmark(args: argparse.Namespace) -> tuple[Any, list[Any], Any]:
    from layerskip.generation import GenerationConfig

    if args.execute_code and args.dataset != "human_eval":
        raise LayerSkipError("--execute_code applies to --dataset human_eval only")
    samples = load_dataset_samples(args)
    loaded = load_model(args)
    config = GenerationConfig.from_options(generation_options(args)).resolved(loaded.config.num_hidden_layers,
                                                                             loaded.defaults, loaded.config.vocab_size)
    return loaded, samples, config


def run_name(args: argparse.Namespace, engine: str, config: Any) -> str:
    suffix = f"_E{config.exit_layer}_k{config.num_speculations}" if config.generation_strategy == "self_speculative" \
        else (f"_E{config.exit_layer}" if config.exit_layer != -1 else "")
    return f"{args.dataset}_{engine}_{config.generation_strategy}{suffix}"


def run_benchmark_command(args: argparse.Namespace) -> int:
    from layerskip.bench.engines import make_engine
    from layerskip.bench.runner import run_benchmarks

    check_batching(args)
    loaded, samples, config = prepare_benchmark(args)
    engines = [args.engine] + ([args.compare] if args.compare and args.compare != args.engine else [])
    runs = {engine: (make_engine(engine, loaded, config, args.max_speculative_batch),
                     Path(args.output_dir) / "benchmark" / run_name(args, engine, config)) for engine in engines}
    results = run_benchmarks(loaded, runs, samples, arguments=vars_for_json(args), chat=args.chat,
                             resume=args.resume, execute_code=args.execute_code, batch_size=args.batch_size)
    summaries = {engine: result["metrics"] for engine, result in results.items()}
    for engine, (_, folder) in runs.items():
        print(f"{engine}: {json.dumps(summaries[engine])}")
        print(f"summary: {folder / 'summary.json'}", file=sys.stderr)
    if len(summaries) == 2:
        print(compare_table(summaries, engines))
    return 0


def compare_table(summaries: dict[str, dict[str, Any]], engines: list[str]) -> str:
    ours, peer = (summaries[name] for name in engines)
    lines = [f"| metric | {engines[0]} | {engines[1]} | ratio |", "|---|---|---|---|"]
    for key in ("tokens_per_second", "time_per_token", "total_time", "acceptance_rate", "rouge1", "rouge2", "rougeL",
                "bleu", "exact_match", "pass@1"):
        if key in ours or key in peer:
            a, b = ours.get(key), peer.get(key)
            ratio = f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) and b else "-"
            lines.append(f"| {key} | {'-' if a is None else f'{a:.4g}'} | {'-' if b is None else f'{b:.4g}'} | {ratio} |")
    return "\n".join(lines)


def run_sweep_command(args: argparse.Namespace) -> int:
    from layerskip.bench.engines import make_engine
    from layerskip.bench.sweep import best_point, parse_float_list, parse_grid, point_key, run_sweep, save_defaults

    loaded, samples, config = prepare_benchmark(args)
    exits = parse_grid(args.exit_layers, "--exit_layers")
    speculations = parse_grid(args.num_speculations, "--num_speculations")
    confidences = parse_float_list(args.draft_confidence, "--draft_confidence")
    candidates = parse_grid(args.draft_candidates, "--draft_candidates")
    output = Path(args.output_dir) / "sweep"
    rows = run_sweep(loaded, samples, config, exits, speculations, output,
                     make_engine=lambda point: make_engine(args.engine, loaded, point),
                     arguments=vars_for_json(args), chat=args.chat, confidences=confidences, candidates=candidates)
    best = best_point(rows)
    print(f"best self-speculative point: exit_layer {best['exit_layer']}, num_speculations {best['num_speculations']}, "
          f"draft_confidence {point_key(best)[2]:g}, draft_candidates {point_key(best)[3]}: "
          f"{float(best['speedup_vs_autoregressive']):.2f}x autoregressive, {float(best['tokens_per_second']):.1f} tokens/s, "
          f"acceptance {float(best['acceptance_rate']):.1%}; table: {output / 'sweep.csv'}, "
          f"heatmap: {output / 'sweep_heatmap.png'}")
    if args.save_defaults:
        stored = save_defaults(Path(args.save_defaults), best, config, args.dataset, args.min_speedup)
        print(f"stored as the model's decoding defaults: {Path(args.save_defaults) / 'layerskip.json'} "
              f"(generation_strategy {stored['generation_strategy']})")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from lm_eval.utils import make_table

    from layerskip.eval.harness import LayerSkipLM, evaluate, load_tasks

    if args.limit is not None and args.limit <= 0:
        raise LayerSkipError(f"--limit must be positive, got {args.limit:g}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise LayerSkipError(f"--num_fewshot must be at least 0, got {args.num_fewshot}")
    selection = load_tasks([name for entry in args.tasks for name in entry.split(",") if name], args.include_path)
    lm = LayerSkipLM(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                     draft_adapter=args.draft_adapter, compile=args.compile,
                     batch_size=args.batch_size, generation_strategy=args.generation_strategy, exit_layer=args.exit_layer,
                     num_speculations=args.num_speculations, seed=args.seed, stop_words=args.stop_words,
                     stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos)
    overrides = {"do_sample": args.sample, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                 "max_gen_toks": args.max_steps}
    results, folder = evaluate(lm, selection, limit=args.limit, num_fewshot=args.num_fewshot,
                               gen_kwargs={key: value for key, value in overrides.items() if value is not None},
                               output_dir=Path(args.output_dir) / "eval", log_samples=args.log_samples,
                               apply_chat_template=args.apply_chat_template)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    for task, speed in lm.speed_report().items():
        print(f"{task}: {format_stats(speed)}")
    print(f"results: {folder}", file=sys.stderr)
    return 0


def run_exits(args: argparse.Namespace) -> int:
    from layerskip.eval.exits import format_report, run_exit_analysis

    output = Path(args.output_dir) / "exits"
    reports = run_exit_analysis([args.model] + ([args.compare] if args.compare else []), args.data_path, output,
                                text_field=args.text_field, seq_len=args.seq_len, num_samples=args.num_samples,
                                gen_tokens=args.gen_tokens, num_speculations=args.num_speculations, seed=args.seed,
                                dtype=args.dtype, device=args.device, quantize=args.quantize,
                                draft_adapter=args.draft_adapter, compile=args.compile)
    for report in reports:
        print(format_report(report) + "\n")
    print(f"table: {output / 'exits.csv'}, plot: {output / 'exits.png'}", file=sys.stderr)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from layerskip.distributed import world_size
    from layerskip.serve import ServerSettings, serve
    from layerskip.serve.replicas import serve_process_group

    settings = ServerSettings(host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                              max_queue=args.max_queue, max_model_len=args.max_model_len, api_key=args.api_key,
                              max_speculative_batch=args.max_speculative_batch, prefill_chunk=args.prefill_chunk)
    if world_size() > 1:  # ranks wait for requests between rounds: a server's process group never times out
        serve_process_group(args.device)
    serve(load_model(args), generation_options(args), settings)
    return 0


def vars_for_json(args: argparse.Namespace) -> dict[str, Any]:
    return {key: value for key, value in vars(args).items() if key != "run"}


def interactive(loaded: Any, run_once: Any, chat: bool | None) -> None:
    """A chat loop: the conversation is kept for chat models; /reset clears it, /quit or Ctrl-D leaves."""
    use_chat = loaded.tokenizer is not None and loaded.tokenizer.has_chat_template and chat is not False
    print(f"layerskip chat with {loaded.name} ({'chat template' if use_chat else 'plain prompts'}); "
          "/reset clears the history, /quit or Ctrl-D leaves.", file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in {"/quit", "/exit"}:
            return
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        if use_chat:
            history.append({"role": "user", "content": line})
            result = run_once(history, None)
            history.append({"role": "assistant", "content": result.text or ""})
        else:
            run_once(line, None)


def close_progress_bars() -> None:
    """End the progress bars an error left open, so that the error gets a line of its own after them."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    from layerskip.distributed import rank

    try:
        args = build_parser().parse_args(argv)
        if rank() > 0:  # under torchrun every rank runs the same rounds; rank 0 speaks, and writes the reports
            sys.stdout = sys.stderr = open(os.devnull, "w")
            if getattr(args, "output_dir", None):  # the others keep their identical records apart, for --resume
                args.output_dir = str(Path(args.output_dir) / f"rank_{rank()}")
        return args.run(args)
    except LayerSkipError as error:
        close_progress_bars()
        message = " ".join(line.strip() for line in str(error).splitlines())  # one line, whatever the cause says
        print(f"layerskip: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
