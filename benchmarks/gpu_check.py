"""The prepared GPU check (issue 18): decoding costs on random-weight models of real shapes, nothing downloaded.

    python benchmarks/gpu_check.py                              # a CUDA machine: Llama-3.2-1B and Llama-3-8B shapes
    python benchmarks/gpu_check.py --device cpu --shapes tiny   # the same code on a CPU (the tests run this)

For each shape, weight format (bf16, int8, int4) and mode (eager; compiled: torch.compile, CUDA graphs):
- plain greedy decoding through the engine, tokens/s, against the bound of this device's memory: bandwidth (a
  device-to-device copy timed in this run) / bytes read per step (the weights, and the keys and values attended);
- c_d, a draft step (layers [0, E) and the head) in units of a full step, against its bytes model;
- c_v for k = 2..8, a verification of k drafts (k + 1 rows through [E, L) and the head) in units of a full step;
- greedy self-speculative tokens against plain ones (eager), and compiled plain tokens against eager ones.

The work runs in order of importance within `--time_budget` seconds (what is left is reported as skipped), and the
JSON is rewritten after every block, so an interrupted run keeps what it measured. At the end one table prints,
with the issue's targets checked: compiled bfloat16 decoding >= 80% of the bound on the 8B shape, a draft step
<= 1.1x its bytes model, verifying k = 4 <= 1.2x a step, greedy identity.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from layerskip.bench.costs import step_seconds, weight_bytes
from layerskip.generation import Autoregressive, SelfSpeculative, generate_ids
from layerskip.generation.engine import synchronize
from layerskip.generation.sampling import Sampler
from layerskip.model import ModelConfig, Transformer
from layerskip.model.kernels.prepare import QUANTIZE, prepare, unprepare
from layerskip.model.static import enable_compiled_steps
from layerskip.model.transformer import rope_inverse_frequencies

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {  # the published configs' shapes (hidden sizes, heads, vocabulary), random weights
    "llama-3.2-1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                                rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
                                rope_scaling=LLAMA3_ROPE),
    "llama-3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                              rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False),
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                        rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True),
}
FORMATS = {"bf16": "bf16", "int8": "int8", "int4": "int4", "fp32": "none"}  # the table's names -> --quantize
SPECULATIONS = range(2, 9)
NEW_TOKENS = 64
TARGETS = {"of_bound": 0.80, "draft_vs_bytes": 1.10, "verify_k4": 1.20}


def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Transformer:
    """A model of this shape with Llama's initialisation (N(0, 0.02), norms at 1), built on the device."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype).to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    model.inv_freq = rope_inverse_frequencies(config).to(device)
    return model.eval()


def copy_bandwidth(device: torch.device, megabytes: int, repeats: int = 5) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written), the best of `repeats`."""
    source = torch.empty(megabytes << 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() / best / 1e9


def kv_bytes(model: Transformer, positions: int) -> float:
    """Bytes of keys and values one step reads at `positions` cached positions."""
    config, element = model.config, model.embed_tokens.weight.element_size()
    return 2.0 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * positions * element


@torch.inference_mode()
def decode(model: Transformer, strategy: Any, prompt: list[int]) -> tuple[list[int], float]:
    """Greedy tokens and seconds of one decoding (after a warm-up call of the same shape)."""
    sampler = Sampler(sample=False, device=model.embed_tokens.weight.device)
    generate_ids(model, prompt, strategy, sampler, max_new_tokens=8)
    result = generate_ids(model, prompt, strategy, sampler, max_new_tokens=NEW_TOKENS)
    return result.token_ids, result.stats.seconds


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def measure(model: Transformer, shape: str, fmt: str, mode: str, bandwidth: float, exit_layer: int,
            eager_tokens: dict[tuple[str, str], list[int]], backend: str) -> dict[str, Any]:
    """One block: a shape, a format, a mode."""
    record: dict[str, Any] = {"shape": shape, "format": fmt, "mode": mode}
    device = model.embed_tokens.weight.device
    started = time.perf_counter()
    prepare(model, "auto", QUANTIZE[FORMATS[fmt]])
    record["prepare_seconds"] = time.perf_counter() - started
    if mode == "compiled":
        report = enable_compiled_steps(model, keep_slower=True, backend=backend)
        record["compile"] = report.as_dict()
        if not report.kept:
            record["skipped"] = f"compiled passes not kept: {report.reason}"
            return record
    layers, head = weight_bytes(model)
    prompt = [1]  # one token: every pass of plain decoding is a one-row step, one graph when compiled
    tokens, seconds = decode(model, Autoregressive(), prompt)
    positions = (model.compiled_steps.kv_cache(len(prompt) + NEW_TOKENS, 1).capacity if model.compiled_steps
                 else len(prompt) + NEW_TOKENS // 2)  # compiled passes attend over the whole cache
    step_bytes = layers + head + kv_bytes(model, positions)
    record.update(weight_bytes=layers + head, step_bytes=step_bytes, tokens_per_second=len(tokens) / seconds,
                  bound_tokens_per_second=bandwidth * 1e9 / step_bytes)
    record["of_bound"] = record["tokens_per_second"] / record["bound_tokens_per_second"]
    costs = {k: step_seconds(model, exit_layer, k, context=64) for k in SPECULATIONS}
    full = statistics.median(c["full"] for c in costs.values())
    draft = statistics.median(c["draft"] for c in costs.values())
    record.update(step_ms=full * 1e3, exit_layer=exit_layer, c_d=draft / full,
                  c_d_bytes_model=(layers * exit_layer / model.num_layers + head) / (layers + head),
                  c_v={k: c["verify"] / full for k, c in costs.items()})
    record["draft_vs_bytes"] = record["c_d"] / record["c_d_bytes_model"]
    if mode == "eager":
        eager_tokens[(shape, fmt)] = tokens
        speculative, _ = decode(model, SelfSpeculative(exit_layer, 4), prompt)
        record["self_speculative_equals_plain"] = speculative == tokens
        record["first_difference"] = first_difference(speculative, tokens)
    elif (shape, fmt) in eager_tokens:
        record["compiled_equals_eager"] = tokens == eager_tokens[(shape, fmt)]
        record["first_difference"] = first_difference(tokens, eager_tokens[(shape, fmt)])
    if device.type == "cuda":
        record["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return record


def plan(shapes: list[str], formats: list[str], modes: list[str]) -> list[tuple[str, str, str]]:
    """The blocks in order of importance and cost: every format eager (seconds each), then compiled (the graphs
    take a while to build), the first format (bfloat16) first and the largest shape first: its compiled decoding
    is the headline target."""
    order = [(s, f, "eager") for f in formats for s in shapes]
    order += [(s, f, "compiled") for f in formats for s in reversed(shapes)]
    return [(s, f, m) for s, f, m in order if m in modes]


def table(records: list[dict[str, Any]], bandwidth: float, device_name: str) -> str:
    lines = [f"Device: {device_name}; copy bandwidth {bandwidth:.0f} GB/s; torch {torch.__version__}; "
             f"{NEW_TOKENS} new tokens, greedy",
             "",
             "| shape | format | mode | tokens/s | bound | of bound | step ms | c_d | bytes model | c_d/model | "
             "c_v k=2 | k=4 | k=8 | greedy identity | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['shape']} | {r['format']} | {r['mode']} | {r.get('skipped') or r['error']} |"
                         + " |" * 11)
            continue
        identity = r.get("self_speculative_equals_plain", r.get("compiled_equals_eager"))
        what = "self-spec = plain" if "self_speculative_equals_plain" in r else "compiled = eager"
        same = "-" if identity is None else (f"{what}: yes" if identity else f"{what}: no, from {r['first_difference']}")
        compile_s = r.get("compile", {}).get("compile_seconds")
        lines.append(f"| {r['shape']} | {r['format']} | {r['mode']} | {r['tokens_per_second']:.1f} | "
                     f"{r['bound_tokens_per_second']:.1f} | {r['of_bound']:.0%} | {r['step_ms']:.2f} | {r['c_d']:.3f} | "
                     f"{r['c_d_bytes_model']:.3f} | {r['draft_vs_bytes']:.2f} | {r['c_v'][2]:.2f} | "
                     f"{r['c_v'][4]:.2f} | {r['c_v'][8]:.2f} | {same} | "
                     f"{'-' if compile_s is None else f'{compile_s:.0f}'} |")
    lines += ["", "Targets:"] + [f"- {line}" for line in check_targets(records)]
    return "\n".join(lines)


def check_targets(records: list[dict[str, Any]]) -> list[str]:
    done = [r for r in records if "c_v" in r]
    lines = []
    headline = [r for r in done if r["format"] == done[0]["format"] and r["mode"] == "compiled"]
    if headline:
        best = max(headline, key=lambda r: SHAPES[r["shape"]].hidden_size)
        verdict = "met" if best["of_bound"] >= TARGETS["of_bound"] else "missed"
        lines.append(f"compiled {best['format']} decoding on {best['shape']}: {best['of_bound']:.0%} of the bound "
                     f"(target >= {TARGETS['of_bound']:.0%}): {verdict}")
    for r in done:
        draft_ok = r["draft_vs_bytes"] <= TARGETS["draft_vs_bytes"]
        verify_ok = r["c_v"][4] <= TARGETS["verify_k4"]
        lines.append(f"{r['shape']} {r['format']} {r['mode']}: draft step {r['draft_vs_bytes']:.2f}x its bytes model "
                     f"({'met' if draft_ok else 'missed'}), c_v(k=4) {r['c_v'][4]:.2f} "
                     f"({'met' if verify_ok else 'missed'})")
    identities = [r.get("self_speculative_equals_plain", r.get("compiled_equals_eager")) for r in done]
    checked = [value for value in identities if value is not None]
    lines.append(f"greedy identity: {sum(checked)} of {len(checked)} checks identical")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--formats", default="bf16,int8,int4", help="of bf16, int8, int4, fp32; the first leads")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--time_budget", type=float, default=240.0,
                        help="seconds after which no new block starts (a block of the 8B shape takes under a minute)")
    parser.add_argument("--output", default="logs/gpu_check.json")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend (aot_eager: the graphs run "
                                                             "op by op, for a quick run of this script on a CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes, formats, modes = args.shapes.split(","), args.formats.split(","), args.modes.split(",")
    unknown = [s for s in shapes if s not in SHAPES] + [f for f in formats if f not in FORMATS] + \
        [m for m in modes if m not in ("eager", "compiled")]
    if unknown:
        print(f"gpu_check: error: unknown shape, format or mode '{unknown[0]}'", file=sys.stderr)
        return 2
    started = time.perf_counter()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bandwidth = copy_bandwidth(device, 2048 if device.type == "cuda" else 256)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = {shape: random_model(SHAPES[shape], dtype, device) for shape in shapes}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    eager_tokens: dict[tuple[str, str], list[int]] = {}
    for shape, fmt, mode in plan(shapes, formats, modes):
        model = models[shape]
        elapsed = time.perf_counter() - started
        if elapsed > args.time_budget:
            record = {"shape": shape, "format": fmt, "mode": mode, "skipped": "time budget"}
        else:
            print(f"gpu_check: {shape} {fmt} {mode} (at {elapsed:.0f} s)", file=sys.stderr, flush=True)
            try:
                record = measure(model, shape, fmt, mode, bandwidth, model.num_layers // 4, eager_tokens, args.backend)
            except Exception as error:  # a kernel or a compile this device lacks: reported, and the check goes on
                record = {"shape": shape, "format": fmt, "mode": mode, "error": f"{type(error).__name__}: {error}"[:300]}
            finally:
                model.compiled_steps = None
                unprepare(model)
                torch._dynamo.reset()
        records.append(record)
        output.write_text(json.dumps({"device": device_name, "bandwidth_gb_s": bandwidth, "records": records},
                                     indent=2))
    print(table(records, bandwidth, device_name))
    print(f"\n{time.perf_counter() - started:.0f} s in all; JSON: {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
