"""Benchmark runner (records, resume), sweep (CSV, heatmap, resume), the HF peer engine, HumanEval execution."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch

import layerskip
from layerskip.bench.engines import HFEngine, LayerSkipEngine
from layerskip.bench.runner import passes_tests, run_benchmark, run_benchmarks
from layerskip.eval.records import read_records
from layerskip.bench.sweep import parse_float_list, parse_grid, run_sweep
from layerskip.cli import main
from layerskip.eval.datasets import Sample, load_samples
from conftest import assert_same_greedy_tokens
from layerskip.generation import GenerationConfig

SAMPLES = [Sample("a", "The capital of France is", " Paris"), Sample("b", "def add(a, b):", " return a + b"),
           Sample("c", "Water boils at", " 100 degrees")]
# Draft settings pinned: the embedded default stores its own (its draft adapter's), which a sweep would take up.
GREEDY = GenerationConfig(sample=False, max_steps=4, ignore_eos=True, draft_confidence=0.0, draft_vocab_size=0,
                          draft_candidates=1)


class CountingEngine:
    """Wraps an engine and counts the generations it runs (the warm-up included), logging them in `log`."""

    def __init__(self, inner, log=None, label=""):
        self.inner, self.name, self.calls, self.log, self.label = inner, inner.name, 0, log, label
        self.batches = inner.batches

    def generate(self, prompt_ids):
        self.calls += 1
        if self.log is not None:
            self.log.append(self.label)
        return self.inner.generate(prompt_ids)


def test_records_are_written_as_they_go_and_resume_continues(default_model, tmp_path):
    engine = CountingEngine(LayerSkipEngine(default_model, GREEDY))
    run_benchmark(default_model, engine, SAMPLES[:2], tmp_path, arguments={})
    first = read_records(tmp_path / "records.jsonl")
    assert [r["id"] for r in first] == ["a", "b"] and engine.calls == 3  # warm-up + 2
    with (tmp_path / "records.jsonl").open("a") as sink:
        sink.write('{"id": "c", "generation": "cut by an interrup')  # a half-written line
    summary = run_benchmark(default_model, engine, SAMPLES, tmp_path, arguments={"x": 1}, resume=True)
    records = read_records(tmp_path / "records.jsonl")
    assert engine.calls == 5  # warm-up + only the missing sample
    assert records[:2] == first and [r["id"] for r in records] == ["a", "b", "c"]
    metrics = summary["metrics"]
    assert metrics["samples"] == 3 and metrics["new_tokens"] == 12
    assert metrics["rouge1"] == pytest.approx(sum(r["scores"]["rouge1"] for r in records) / 3)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["arguments"] == {"x": 1} and saved["environment"]["torch"] == torch.__version__


def test_a_batched_benchmark_decodes_as_one_at_a_time_and_counts_each_batch_once(default_model, tmp_path):
    config = dataclasses.replace(GREEDY, generation_strategy="self_speculative", exit_layer=2, num_speculations=2)
    single = run_benchmark(default_model, LayerSkipEngine(default_model, config), SAMPLES, tmp_path / "one",
                           arguments={})
    engine = CountingEngine(LayerSkipEngine(default_model, config))
    summary = run_benchmarks(default_model, {"b": (engine, tmp_path / "two")}, SAMPLES, arguments={},
                             batch_size=2)["b"]
    assert engine.calls == 3  # warm-up, then batches [a, b] and [c]
    records = {r["id"]: r for r in read_records(tmp_path / "two" / "records.jsonl")}
    alone = {r["id"]: r for r in read_records(tmp_path / "one" / "records.jsonl")}
    assert [records[key].get("batch") for key in "abc"] == ["a", "a", None]
    for key, sample in zip("abc", SAMPLES):
        ids = layerskip.encode_prompt(default_model, sample.prompt)
        assert_same_greedy_tokens(default_model, ids, default_model.tokenizer.encode(alone[key]["generation"]),
                                  default_model.tokenizer.encode(records[key]["generation"]))
    seconds = max(records["a"]["stats"]["seconds"], records["b"]["stats"]["seconds"]) + records["c"]["stats"]["seconds"]
    metrics = summary["metrics"]
    assert metrics["total_time"] == pytest.approx(seconds) and metrics["new_tokens"] == single["metrics"]["new_tokens"]
    assert metrics["mean_latency"] == pytest.approx(sum(r["stats"]["seconds"] for r in records.values()) / 3)
    assert "acceptance_rate" in metrics and metrics["accepted_length_counts"]
    # An engine that decodes a list one prompt after another (HF's): its rows' times add up.
    sequential = CountingEngine(LayerSkipEngine(default_model, config))
    sequential.batches = False
    summary = run_benchmarks(default_model, {"s": (sequential, tmp_path / "three")}, SAMPLES, arguments={},
                             batch_size=2)["s"]
    records = read_records(tmp_path / "three" / "records.jsonl")
    assert all("batch" not in record for record in records)
    assert summary["metrics"]["total_time"] == pytest.approx(sum(r["stats"]["seconds"] for r in records))


def test_compared_engines_run_interleaved_and_resume_separately(default_model, tmp_path):
    log = []
    ours = CountingEngine(LayerSkipEngine(default_model, GREEDY), log, "ours")
    peer = CountingEngine(HFEngine(default_model, GREEDY), log, "hf")
    runs = {"ours": (ours, tmp_path / "ours"), "hf": (peer, tmp_path / "hf")}
    run_benchmarks(default_model, runs, SAMPLES[:1], arguments={})
    assert log == ["ours", "hf", "ours", "hf"]  # warm-ups, then sample a on each
    log.clear()
    summaries = run_benchmarks(default_model, runs, SAMPLES, arguments={}, resume=True)
    assert log == ["ours", "hf", "ours", "hf", "ours", "hf"]  # warm-ups, then b and c interleaved
    for name in runs:
        assert [r["id"] for r in read_records(tmp_path / name / "records.jsonl")] == ["a", "b", "c"]
        assert summaries[name]["metrics"]["samples"] == 3 and summaries[name]["engine"] == runs[name][0].name
    texts = {name: [r["generation"] for r in read_records(tmp_path / name / "records.jsonl")] for name in runs}
    assert texts["ours"] == texts["hf"]  # greedy: the same continuations through both engines


def test_sweep_writes_csv_rows_and_heatmap_and_resumes(default_model, tmp_path):
    made = []

    def make_engine(config):
        made.append(config)
        return LayerSkipEngine(default_model, config)

    rows = run_sweep(default_model, SAMPLES[:2], GREEDY, [20, 26], [1, 2], tmp_path, make_engine=make_engine,
                     arguments={})
    assert len(made) == 5 and made[0].generation_strategy == "autoregressive"
    table = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [(int(r["exit_layer"]), int(r["num_speculations"])) for r in table] == \
        [(30, 0), (20, 1), (20, 2), (26, 1), (26, 2)]
    assert float(table[0]["speedup_vs_autoregressive"]) == 1.0
    for row in table[1:]:
        assert 0 <= float(row["acceptance_rate"]) <= 1
        assert float(row["speedup_vs_autoregressive"]) == pytest.approx(
            float(row["tokens_per_second"]) / float(table[0]["tokens_per_second"]))
    assert (tmp_path / "sweep_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(rows) == 5
    run_sweep(default_model, SAMPLES[:2], GREEDY, [20, 26], [1, 2], tmp_path, make_engine=make_engine, arguments={})
    assert len(made) == 5 and len(list(csv.DictReader((tmp_path / "sweep.csv").open()))) == 5
    # draft confidence as a third axis, then tree candidates as a fourth: only the new point runs, under its own name
    for axis, column, convert, expected, folder in (
            (dict(confidences=[0.0, 0.9]), "draft_confidence", float, [("26", "2", 0.0), ("20", "2", 0.9)], "E20_k2_c0.9"),
            (dict(candidates=[1, 3]), "draft_candidates", int, [("20", "2", 1), ("20", "2", 3)], "E20_k2_m3")):
        before = len(made)
        run_sweep(default_model, SAMPLES[:2], GREEDY, [20], [2], tmp_path, make_engine=make_engine, arguments={},
                  **axis)
        assert len(made) == before + 1 and getattr(made[-1], column) == expected[-1][2]
        table = list(csv.DictReader((tmp_path / "sweep.csv").open()))
        assert [(r["exit_layer"], r["num_speculations"], convert(r[column])) for r in table[-2:]] == expected
        assert (tmp_path / "points" / folder).is_dir()


def test_sweep_best_point_is_stored_as_the_model_defaults(tmp_path):
    from layerskip.bench.sweep import best_point, save_defaults

    rows = [{"exit_layer": 30, "num_speculations": 0, "speedup_vs_autoregressive": 1.0, "acceptance_rate": ""},
            {"exit_layer": 6, "num_speculations": 4, "speedup_vs_autoregressive": 1.31, "acceptance_rate": 0.6,
             "draft_confidence": "0.3"},
            {"exit_layer": 10, "num_speculations": 2, "speedup_vs_autoregressive": 1.12, "acceptance_rate": 0.7}]
    (tmp_path / "layerskip.json").write_text(json.dumps({"draft_vocab": [5, 3, 9]}))
    base = dataclasses.replace(GREEDY, draft_vocab_size=2, draft_confidence=0.0)  # the row's confidence is stored
    stored = save_defaults(tmp_path, best_point(rows), base, "custom_jsonl")
    assert json.loads((tmp_path / "layerskip.json").read_text()) == stored
    assert stored == {"draft_vocab": [5, 3, 9], "generation_strategy": "self_speculative", "exit_layer": 6,
                      "num_speculations": 4, "draft_vocab_size": 2, "draft_confidence": 0.3, "draft_candidates": 1,
                      "sweep": {"dataset": "custom_jsonl", "speedup_vs_autoregressive": 1.31, "acceptance_rate": 0.6}}
    slower = [{**row, "speedup_vs_autoregressive": 0.9} for row in rows[1:]]
    assert save_defaults(tmp_path, best_point(slower), base, "x")["generation_strategy"] == "autoregressive"
    within_noise = [{**row, "speedup_vs_autoregressive": 1.04} for row in rows[1:]]
    assert save_defaults(tmp_path, best_point(within_noise), base, "x")["generation_strategy"] == "autoregressive"
    assert save_defaults(tmp_path, best_point(within_noise), base, "x", min_speedup=1.02)["generation_strategy"] \
        == "self_speculative"


def test_sweep_points_keep_the_draft_flags_of_a_model_stored_as_autoregressive(tmp_path):
    """A model whose stored strategy is autoregressive (every model before its sweep) still sweeps with the
    given --draft_vocab_size; the autoregressive baseline drafts nothing."""
    from layerskip.cli import build_parser, generation_options

    args = build_parser().parse_args(["sweep", "--dataset", "human_eval", "--exit_layers", "8",
                                      "--num_speculations", "2,4", "--draft_vocab_size", "3"])
    stored = {"generation_strategy": "autoregressive", "draft_vocab": [5, 3, 9, 7]}
    base = GenerationConfig.from_options(generation_options(args)).resolved(30, stored)
    assert base.draft_vocab_size == 3

    class Loaded:  # what run_sweep reads of a loaded model before it runs anything
        config = dataclasses.make_dataclass("Config", [("num_hidden_layers", int)])(30)
        defaults = stored

    class Stop(Exception):
        """Raised at the first point: only the configs are under test."""

    made = []

    def make_engine(config):
        made.append(config)
        raise Stop

    with pytest.raises(Stop):
        run_sweep(Loaded(), SAMPLES[:1], base, [8], [2, 4], tmp_path, make_engine=make_engine,
                  arguments={})
    assert made[0].generation_strategy == "autoregressive" and made[0].draft_vocab_size == 0


def test_parse_grid():
    assert parse_grid("2:8:2", "--x") == [2, 4, 6, 8] and parse_grid("4,8,12", "--x") == [4, 8, 12]
    with pytest.raises(layerskip.LayerSkipError, match="--x takes a list"):
        parse_grid("a:b", "--x")
    assert parse_float_list("0,0.5", "--c") == [0.0, 0.5]
    with pytest.raises(layerskip.LayerSkipError, match="--c takes a list of numbers"):
        parse_float_list("0,high", "--c")


def test_hf_engine_matches_ours_on_a_tiny_model(tiny_checkpoint):
    folder, _ = tiny_checkpoint()
    loaded = layerskip.load(str(folder))
    prompt = [3, 14, 15, 92, 65]
    for config in (GREEDY, GenerationConfig(sample=False, max_steps=6, ignore_eos=True,
                                            generation_strategy="self_speculative", exit_layer=2, num_speculations=3)):
        [ours] = LayerSkipEngine(loaded, config).generate([prompt])
        [peer] = HFEngine(loaded, config).generate([prompt])
        assert_same_greedy_tokens(loaded, prompt, peer.token_ids, ours.token_ids, row_invariant=False)  # HF: MKL
        assert peer.stats["new_tokens"] == config.max_steps


def test_human_eval_execution_runs_the_problem_tests():
    problem = load_samples("human_eval", num_samples=1, seed=0)[0]
    assert passes_tests(problem, problem.extra["canonical_solution"])
    assert not passes_tests(problem, "    return None\n")
    # a chat reply: the function rewritten in a fenced block, with prose around it
    entry = problem.extra["entry_point"]
    signature = next(line for line in problem.prompt.splitlines() if line.startswith(f"def {entry}"))
    reply = f"Here it is:\n```python\n{signature}\n{problem.extra['canonical_solution']}```\nIt works."
    assert passes_tests(problem, reply)
    assert not passes_tests(problem, f"```python\n{signature}\n    return None\n```")
    # an unfenced reply whose example calls would raise, cut mid-statement by the token budget
    body = problem.extra["canonical_solution"]
    assert passes_tests(problem, f"{signature}\n{body}\nprint(undefined_name(1))\nassert False\nprint(f(")
    assert passes_tests(problem, f"{signature}\n{body}```\n\nThis works because x(y) holds.")  # no opening fence


def test_benchmark_compare_hf_prints_ratios(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"prompt": "Say hi.", "response": "Hi!"}\n')
    code = main(["benchmark", "--dataset", "custom_jsonl", "--data_path", str(tmp_path / "d.jsonl"), "--chat",
                 "--sample", "false", "--max_steps", "4", "--output_dir", str(tmp_path), "--compare", "hf",
                 "--generation_strategy", "autoregressive"])
    out = capsys.readouterr().out
    assert code == 0 and "| tokens_per_second |" in out and "| rouge1 |" in out
    assert (tmp_path / "benchmark" / "custom_jsonl_hf_autoregressive" / "summary.json").is_file()


def test_benchmark_errors(capsys):
    assert main(["benchmark", "--dataset", "custom_jsonl", "--data_path", "/no/such.jsonl"]) == 2
    assert main(["benchmark", "--dataset", "top_v2", "--execute_code"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--execute_code applies to --dataset human_eval only" in err
    # batch flags, refused before anything loads
    assert main(["benchmark", "--dataset", "top_v2", "--batch_size", "0"]) == 2
    assert main(["correctness", "--dataset", "top_v2", "--batch_size", "-1"]) == 2
    assert main(["benchmark", "--dataset", "top_v2", "--max_speculative_batch", "-2"]) == 2
    assert main(["generate", "--prompt", "x", "--max_speculative_batch", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["layerskip: error: --batch_size must be at least 1, got 0",
                     "layerskip: error: --batch_size must be at least 1, got -1",
                     "layerskip: error: --max_speculative_batch must be >= 0 (0: no limit), got -2",
                     "layerskip: error: --max_speculative_batch applies to batches: give --prompts_file"]
