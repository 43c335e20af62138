"""CPU decoding against llama.cpp, in one run: llama.cpp on the embedded GGUF file, HF transformers (float32),
and our engine in each weight format (float32, bfloat16, Q8_0, Q4_1), autoregressive and self-speculative.

Every engine decodes greedily from the same prompt token ids, exactly --max_steps new tokens (EOS ignored), on
--threads threads, and is timed end to end (prompt evaluation + the new tokens). Engines are interleaved: for
each repeat, for each prompt, every engine runs in turn, so machine noise hits all alike. Every measurement is
appended to <output_dir>/runs.jsonl as it finishes; rerunning the same command resumes (key: engine, prompt,
repeat; records made with another --max_steps are ignored).

Measured before the decoding loop, in the same run:
- the read bandwidth: median of several torch.sum over a 512 MB float32 tensor;
- per format: the bytes of weights streamed per token (all prepared linears, the head included), the
  weight-stream bound bandwidth / bytes on tokens/s, and the cost model's c_d and c_v (measure_step_costs) at
  each --configs point, and c_v for verifications of 2 to 8 rows at the first point's exit;
- per format: perplexity on held-out text (--ppl_text, tokenized without the chat template, the first
  --ppl_tokens tokens, in non-overlapping windows of --ppl_window tokens, one forward pass each); also HF's
  and llama.cpp's on the same token ids, as checks.
After it: each engine's token agreement with our float32 autoregressive output and with llama.cpp's (the
common prefix's length / N, mean over prompts and repeats).

The table gives tokens/s (mean over runs of new_tokens / seconds), the ratio to llama.cpp, the fraction of
the weight-stream bound, and for self-speculative rows c_d, c_v, the acceptance rate, tokens per round T and
the cost model's speedup T / (k c_d + c_v) (k: the drafts per round as made) next to the measured speedup
over the same format's autoregressive decoding. The default model is not LayerSkip-trained, so its
self-speculative points are expected to be slower than autoregressive decoding.

llama.cpp runs when `import llama_cpp` works (llama-cpp-python); it is skipped with a note otherwise.

    python benchmarks/bench_cpu.py --output_dir logs/bench_cpu
    python benchmarks/bench_cpu.py --max_steps 8 --repeats 1 --prompts 1 --formats none,int4 \\
        --output_dir logs/bench_cpu_smoke    # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import layerskip
from layerskip.bench.costs import measure_step_costs, weight_bytes
from layerskip.loading.default_model import embedded_gguf_path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    ("code", "Write a Python function that returns the n-th Fibonacci number."),
    ("prose", "Describe a quiet morning in a small fishing village."),
    ("chat", "What are some good ways to stay focused while studying?"),
    ("code", "Write a SQL query that counts the orders of each customer."),
    ("prose", "Explain how a rainbow forms, in simple words."),
    ("chat", "Can you suggest a name for my new cat?"),
]
LLAMA = "llama.cpp"
HF = "hf"
FORMAT_NAMES = {"none": "float32", "bf16": "bfloat16", "int8": "Q8_0", "int4": "Q4_1"}


VERIFY_DRAFTS = range(1, 8)  # c_v is also measured for these k: verifications of 2 to 8 rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--formats", default="none,bf16,int8,int4", help="our --quantize values, comma-separated")
    parser.add_argument("--configs", default="8:4,15:4", help="self-speculative exit_layer:num_speculations points")
    parser.add_argument("--cpu_kernels", default=None, help="our CPU kernel path (default: $LAYERSKIP_CPU_KERNELS or auto)")
    parser.add_argument("--max_steps", type=int, default=64, help="new tokens per run (a fixed count: EOS ignored)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4, help=f"how many of the {len(PROMPTS)} built-in prompts")
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine")
    parser.add_argument("--ppl_text", default=f"{REPO / 'README.md'},{REPO / 'docs' / 'BENCHMARKS.md'}",
                        help="text files for perplexity, comma-separated, concatenated")
    parser.add_argument("--ppl_tokens", type=int, default=2048)
    parser.add_argument("--ppl_window", type=int, default=512)
    parser.add_argument("--bandwidth_mb", type=int, default=512)
    parser.add_argument("--output_dir", default="logs/bench_cpu")
    parser.add_argument("--no_hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--no_llama", action="store_true", help="skip llama.cpp")
    return parser.parse_args()


def parse_configs(text: str) -> list[tuple[int, int]]:
    configs = []
    for item in filter(None, text.split(",")):
        exit_layer, speculations = (int(part) for part in item.split(":"))
        configs.append((exit_layer, speculations))
    return configs


def ours(quantize: str, config: tuple[int, int] | None = None) -> str:
    return f"ours_{quantize}_ar" if config is None else f"ours_{quantize}_E{config[0]}_k{config[1]}"


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": model, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags}


def read_bandwidth(megabytes: int, repeats: int = 7) -> float:
    """Read bandwidth in GB/s: the median of several torch.sum over a float32 tensor of `megabytes` MB."""
    data = torch.ones(megabytes * 1_000_000 // 4, dtype=torch.float32)
    torch.sum(data)  # warm-up: page faults, thread pool
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.sum(data)
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times) / 1e9


def ppl_ids(loaded, paths: str, count: int) -> list[int]:
    text = "\n\n".join(Path(path).read_text() for path in paths.split(",") if path)
    return loaded.tokenizer.encode(text)[:count]


def windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[start:start + size] for start in range(0, len(ids), size) if len(ids[start:start + size]) > 1]


def perplexity(logits_of, ids: list[int], size: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows, each a fresh context; `logits_of(window)` gives
    float logits [T, V]."""
    nll, count = 0.0, 0
    for window in windows(ids, size):
        logits = logits_of(window).float()
        targets = torch.tensor(window[1:])
        nll += torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum").item()
        count += len(targets)
    return math.exp(nll / count)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
    formats = [item for item in args.formats.split(",") if item]
    configs = parse_configs(args.configs)
    prompts = PROMPTS[:args.prompts]
    N = args.max_steps
    notes: list[str] = []

    done: dict[tuple[str, int, int], dict] = {}
    if runs_path.exists():
        for line in runs_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record.get("max_steps") == N:
                    done[(record["engine"], record["prompt"], record["repeat"])] = record

    system = {"command": command, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_info(),
              "python": platform.python_version(), "load_average": list(os.getloadavg())}
    print(f"{command}\ntorch {system['torch']}, {system['threads']} threads, CPU {system['cpu']['model']} "
          f"(avx2: {system['cpu']['avx2']}, avx512f: {system['cpu']['avx512f']})", flush=True)
    system["bandwidth_gbs"] = bandwidth = read_bandwidth(args.bandwidth_mb)
    print(f"read bandwidth: {bandwidth:.1f} GB/s (median torch.sum over {args.bandwidth_mb} MB float32)", flush=True)

    loaded = {}
    for quantize in tqdm(formats, desc="loading", unit="format"):
        loaded[quantize] = layerskip.load(args.model, quantize=quantize, cpu_kernels=args.cpu_kernels)
    first = loaded[formats[0]]
    prompt_ids = [layerskip.encode_prompt(first, text, chat=True) for _, text in prompts]
    ids_for_ppl = ppl_ids(first, args.ppl_text, args.ppl_tokens)

    llm = None
    if not args.no_llama:
        try:
            import llama_cpp
        except ImportError as error:
            notes.append(f"llama.cpp skipped: `import llama_cpp` failed ({error}); "
                         "pip install llama-cpp-python to compare against it")
        else:
            if args.model is not None:
                notes.append("llama.cpp runs the embedded GGUF file, not --model")
            gguf = str(embedded_gguf_path())
            n_ctx = max(len(ids) for ids in prompt_ids) + N + 16
            n_ctx = max(512, -(-n_ctx // 256) * 256)
            llm = llama_cpp.Llama(model_path=gguf, n_threads=args.threads, n_threads_batch=args.threads,
                                  n_ctx=n_ctx, verbose=False)
            system["llama_cpp"] = {"version": llama_cpp.__version__, "gguf": gguf,
                                   "gguf_bytes": Path(gguf).stat().st_size, "n_ctx": n_ctx}
    else:
        notes.append("llama.cpp skipped (--no_llama)")

    hf_model = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_model = AutoModelForCausalLM.from_pretrained(str(first.folder), dtype=torch.float32).eval()

    # Per format: bytes per token, the bound, c_d and c_v, perplexity.
    metrics: dict[str, dict] = {}
    for quantize in tqdm(formats, desc="costs and perplexity", unit="format"):
        model = loaded[quantize].model
        nbytes = sum(weight_bytes(model))  # read per decoded token, the head included
        with torch.inference_mode():
            costs = {config: measure_step_costs(model, *config) for config in configs}
            exit_layer = configs[0][0] if configs else model.num_layers // 4
            verify_rows = {k + 1: measure_step_costs(model, exit_layer, k)[1] for k in VERIFY_DRAFTS}
            ppl = perplexity(lambda window: model(torch.tensor([window]))[0], ids_for_ppl, args.ppl_window)
        metrics[quantize] = {"weight_format": model.weight_format, "kernel_path": model.kernel_path,
                             "weight_bytes": nbytes, "bound_tokens_per_second": bandwidth * 1e9 / nbytes if nbytes else None,
                             "costs": {f"{e}:{k}": list(cost) for (e, k), cost in costs.items()},
                             "c_v_by_rows": {"exit_layer": exit_layer, **verify_rows}, "perplexity": ppl}
    extra_ppl = {}
    if hf_model is not None:
        with torch.inference_mode():
            extra_ppl[HF] = perplexity(lambda window: hf_model(torch.tensor([window])).logits[0], ids_for_ppl,
                                       args.ppl_window)
    if llm is not None:
        extra_ppl[LLAMA] = llama_perplexity(ids_for_ppl, args)
    for quantize, m in metrics.items():
        print(f"{quantize} ({m['weight_format']}, {m['kernel_path']}): "
              f"{m['weight_bytes'] / 1e6 if m['weight_bytes'] else float('nan'):.1f} MB of weights per token, "
              f"bound {m['bound_tokens_per_second'] or float('nan'):.0f} tokens/s, perplexity {m['perplexity']:.3f}, "
              + ", ".join(f"E{key}: c_d {c[0]:.3f} c_v {c[1]:.3f}" for key, c in m["costs"].items()), flush=True)
    for engine, value in extra_ppl.items():
        print(f"{engine}: perplexity {value:.3f}", flush=True)

    engines = ([LLAMA] if llm is not None else []) + ([HF] if hf_model is not None else [])
    engines += [ours(q) for q in formats] + [ours(q, c) for q in formats for c in configs]
    engine_format = {ours(q, c): q for q in formats for c in [None, *configs]}
    engine_config = {ours(q, c): c for q in formats for c in configs}

    def run(engine: str, ids: list[int], steps: int) -> dict:
        if engine == LLAMA:
            llm.reset()
            tokens = []
            start = time.perf_counter()
            for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
                tokens.append(int(token))
                if len(tokens) >= steps:
                    break
            seconds = time.perf_counter() - start
            return {"new_tokens": len(tokens), "seconds": seconds, "token_ids": tokens}
        if engine == HF:
            inputs = torch.tensor([ids])
            start = time.perf_counter()
            with torch.inference_mode():
                output = hf_model.generate(inputs, attention_mask=torch.ones_like(inputs), min_new_tokens=steps,
                                           max_new_tokens=steps, do_sample=False,
                                           pad_token_id=first.eos_token_ids[0])
            seconds = time.perf_counter() - start
            tokens = output[0, len(ids):].tolist()
            return {"new_tokens": len(tokens), "seconds": seconds, "token_ids": tokens}
        options = dict(sample=False, max_steps=steps, ignore_eos=True)
        config = engine_config.get(engine)
        if config is not None:
            options.update(generation_strategy="self_speculative", exit_layer=config[0], num_speculations=config[1],
                           draft_vocab_size=0, draft_confidence=0)
        else:
            options.update(generation_strategy="autoregressive")
        start = time.perf_counter()
        result = layerskip.generate(loaded[engine_format[engine]], prompt_ids=ids, **options)
        seconds = time.perf_counter() - start
        stats = result.stats
        return {"new_tokens": stats.new_tokens, "seconds": seconds, "stats_seconds": stats.seconds,
                "rounds": stats.rounds, "drafted": stats.drafted_tokens, "accepted": stats.accepted_drafts,
                "acceptance_rate": stats.acceptance_rate, "token_ids": list(result.token_ids)}

    for engine in tqdm(engines, desc="warm-up", unit="engine"):  # first calls pay for allocation, kernel selection
        run(engine, prompt_ids[0], 4)
    jobs = [(r, p, e) for r in range(args.repeats) for p in range(len(prompts)) for e in engines
            if (e, p, r) not in done]
    with runs_path.open("a") as sink:
        for repeat, prompt, engine in tqdm(jobs, desc="decoding", unit="run"):
            record = {"engine": engine, "prompt": prompt, "repeat": repeat, "max_steps": N,
                      **run(engine, prompt_ids[prompt], N)}
            if record["new_tokens"] != N:
                notes.append(f"{engine} made {record['new_tokens']} tokens, not {N}, on prompt {prompt}")
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            done[(engine, prompt, repeat)] = record

    rows = summarize(engines, done, metrics, engine_format, engine_config, extra_ppl, len(prompts), args.repeats, N)
    lines = render(rows, system, metrics, extra_ppl, notes, args, len(prompts))
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    summary = {"system": system, "args": vars(args), "formats": metrics, "perplexity_checks": extra_ppl,
               "rows": rows, "notes": notes, "prompts": [text for _, text in prompts],
               "prompt_ids": prompt_ids, "ppl_tokens": len(ids_for_ppl)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def llama_perplexity(ids: list[int], args: argparse.Namespace) -> float:
    """llama.cpp's perplexity on the same token ids and windows: an instance keeping every position's logits."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(embedded_gguf_path()), n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=max(512, args.ppl_window), n_batch=args.ppl_window, logits_all=True, verbose=False)

    def logits_of(window: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(window)
        return torch.from_numpy(np.array(llm.scores[:len(window)], dtype=np.float32))

    try:
        return perplexity(logits_of, ids, args.ppl_window)
    finally:
        if hasattr(llm, "close"):
            llm.close()


def summarize(engines, done, metrics, engine_format, engine_config, extra_ppl, prompts, repeats, N) -> list[dict]:
    records = {engine: [done[(engine, p, r)] for r in range(repeats) for p in range(prompts)
                        if (engine, p, r) in done] for engine in engines}

    def reference(engine: str) -> dict[int, list[int]]:
        return {r["prompt"]: r["token_ids"] for r in reversed(records.get(engine, []))}  # repeat 0 wins

    def agreement(engine: str, ref: dict[int, list[int]]) -> float | None:
        pairs = [(r["token_ids"], ref[r["prompt"]]) for r in records[engine] if r["prompt"] in ref]
        return statistics.mean(common_prefix(a, b) / N for a, b in pairs) if pairs else None

    fp32 = reference(ours("none")) if ours("none") in engines else {}
    llama = reference(LLAMA) if LLAMA in engines else {}
    rows = []
    for engine in engines:
        chosen = records[engine]
        if not chosen:
            continue
        quantize = engine_format.get(engine)
        row = {"engine": engine, "runs": len(chosen),
               "format": FORMAT_NAMES.get(quantize, "Q4_1 + Q8_0 head" if engine == LLAMA else "float32"),
               "tokens_per_second": statistics.mean(r["new_tokens"] / r["seconds"] for r in chosen),
               "median_tokens_per_second": statistics.median(r["new_tokens"] / r["seconds"] for r in chosen),
               "agree_fp32": agreement(engine, fp32), "agree_llama": agreement(engine, llama),
               "perplexity": metrics[quantize]["perplexity"] if quantize else extra_ppl.get(engine)}
        bound_format = quantize or ("int4" if engine == LLAMA and "int4" in metrics else None)
        if bound_format and metrics[bound_format]["bound_tokens_per_second"]:
            row["bound_fraction"] = row["tokens_per_second"] / metrics[bound_format]["bound_tokens_per_second"]
        config = engine_config.get(engine)
        if config is not None:
            rounds = sum(r["rounds"] for r in chosen)
            drafted = sum(r["drafted"] for r in chosen)
            c_d, c_v = metrics[quantize]["costs"][f"{config[0]}:{config[1]}"]
            per_round = sum(r["new_tokens"] for r in chosen) / rounds
            row.update(c_d=c_d, c_v=c_v, acceptance=sum(r["accepted"] for r in chosen) / drafted if drafted else None,
                       tokens_per_round=per_round, drafts_per_round=drafted / rounds,
                       predicted=per_round / (drafted / rounds * c_d + c_v))
        rows.append(row)
    by_name = {row["engine"]: row for row in rows}
    for row in rows:
        if LLAMA in by_name:
            row["vs_llama"] = row["tokens_per_second"] / by_name[LLAMA]["tokens_per_second"]
        quantize = engine_format.get(row["engine"])
        base = by_name.get(ours(quantize)) if quantize else None
        if row["engine"] in engine_config and base:
            row["measured_vs_ar"] = row["tokens_per_second"] / base["tokens_per_second"]
    return rows


def render(rows, system, metrics, extra_ppl, notes, args, prompts) -> list[str]:
    def fmt(value, spec, suffix=""):
        return "-" if value is None else format(value, spec) + suffix

    cpu = system["cpu"]
    lines = [f"Command: `{system['command']}`",
             f"Machine: {cpu['model']} (avx2: {'yes' if cpu['avx2'] else 'no'}, avx512f: "
             f"{'yes' if cpu['avx512f'] else 'no'}), {system['threads']} threads, torch {system['torch']}"
             + (f", llama-cpp-python {system['llama_cpp']['version']}" if "llama_cpp" in system else "")
             + f"; read bandwidth {system['bandwidth_gbs']:.1f} GB/s; load average at start "
             + " ".join(f"{value:.2f}" for value in system["load_average"]) + ".",
             f"{args.max_steps} new tokens (EOS ignored) x {prompts} chat prompts x {args.repeats} repeats, greedy, "
             f"timed end to end (prompt + new tokens); perplexity over {args.ppl_tokens} tokens in windows of "
             f"{args.ppl_window}.",
             "",
             "| format | kernel path | MB of weights / token | bound tokens/s | perplexity |",
             "|---|---|---|---|---|"]
    for quantize, m in metrics.items():
        lines.append(f"| {quantize} ({m['weight_format']}) | {m['kernel_path']} | "
                     f"{fmt(m['weight_bytes'] and m['weight_bytes'] / 1e6, '.1f')} | "
                     f"{fmt(m['bound_tokens_per_second'], '.0f')} | {m['perplexity']:.3f} |")
    for engine, value in extra_ppl.items():
        lines.append(f"| {engine} | - | - | - | {value:.3f} |")
    counts = [k + 1 for k in VERIFY_DRAFTS]
    exit_layer = next(iter(metrics.values()))["c_v_by_rows"]["exit_layer"] if metrics else None
    lines += ["", f"c_v by the rows a verification holds (k drafts + 1, through layers [{exit_layer}, L) and the head):", "",
              "| format | " + " | ".join(f"{n} rows" for n in counts) + " |", "|---|" + "---|" * len(counts)]
    for quantize, m in metrics.items():
        lines.append(f"| {quantize} | " + " | ".join(f"{m['c_v_by_rows'][n]:.3f}" for n in counts) + " |")
    lines += ["",
              "| engine | weights | tokens/s | median | vs llama.cpp | of bound | c_d | c_v | acceptance | tokens/round | "
              "cost model vs AR | measured vs AR | agree fp32 | agree llama.cpp | perplexity |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['engine']} | {row['format']} | {row['tokens_per_second']:.1f} | "
            f"{row['median_tokens_per_second']:.1f} | {fmt(row.get('vs_llama'), '.2f', 'x')} | "
            f"{fmt(row.get('bound_fraction'), '.0%')} | {fmt(row.get('c_d'), '.3f')} | {fmt(row.get('c_v'), '.3f')} | "
            f"{fmt(row.get('acceptance'), '.1%')} | {fmt(row.get('tokens_per_round'), '.2f')} | "
            f"{fmt(row.get('predicted'), '.2f', 'x')} | {fmt(row.get('measured_vs_ar'), '.2f', 'x')} | "
            f"{fmt(row['agree_fp32'], '.0%')} | {fmt(row['agree_llama'], '.0%')} | {fmt(row['perplexity'], '.3f')} |")
    lines += ["",
              "tokens/s: the mean over runs of new tokens / seconds (median: their median, which an outlier run moves "
              "less); ratios use the mean. of bound: tokens/s over read bandwidth / bytes of weights per token (llama.cpp: against int4's bytes, "
              "the same Q4_1 and Q8_0 blocks). cost model: T / (k c_d + c_v), T the measured tokens per round, k the "
              "drafts per round as made. agree: mean common-prefix length / N with our float32 autoregressive output "
              "and with llama.cpp's."]
    lines += [f"Note: {note}" for note in dict.fromkeys(notes)]
    return lines


if __name__ == "__main__":
    main()
