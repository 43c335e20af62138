"""layerskip exits: per-exit metrics against direct early-exit forwards, the self-speculation replay against real
self-speculative decoding, text sets, resume, the CSV and the plot, and user errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import layerskip
from layerskip.api import generate_with_config
from layerskip.errors import LayerSkipError
from layerskip.eval import exits
from layerskip.eval.exits import (analyze_exits, draft_costs, estimated_speedup, exit_figure,
                                  make_chunks, measure_chunk, read_documents, run_exit_analysis,
                                  simulate_greedy_speculation)
from layerskip.generation import GenerationConfig, GenerationStats

SEQ_LEN = 40  # above the 32 rows where decoding passes switch to prepacked weights


def token_chunks(count: int, length: int = SEQ_LEN, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (count, length), generator=generator).tolist()


@pytest.fixture
def trained_like(tiny_checkpoint):
    """A tiny model whose layers after the first barely change the residual stream, so early exits agree with
    the last layer most of the time, as after LayerSkip training: acceptance spans 0 to k drafts per round."""

    def write(name: str = "after"):
        folder, hf = tiny_checkpoint(name)
        with torch.no_grad():
            for layer in hf.model.layers[1:]:
                layer.self_attn.o_proj.weight.mul_(0.1)
                layer.mlp.down_proj.weight.mul_(0.1)
        hf.save_pretrained(folder)
        return folder

    return write


def write_token_jsonl(path, chunks, field="ids") -> None:
    path.write_text("".join(json.dumps({field: chunk}) + "\n" for chunk in chunks))


def test_agreement_and_perplexity_equal_direct_early_exit_forwards(tiny_checkpoint):
    folder, _ = tiny_checkpoint()
    loaded = layerskip.load(str(folder))
    chunks = token_chunks(2)
    report = analyze_exits(loaded, chunks, gen_tokens=8, progress=False)
    ids = torch.tensor(chunks)
    with torch.inference_mode():
        final = loaded.model(ids).argmax(-1)[:, :-1]
        for row in report.rows:
            logits = loaded.model(ids, exit_layer=row.layer)[:, :-1]
            agreement = (logits.argmax(-1) == final).sum().item() / final.numel()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            assert row.agreement == agreement
            assert row.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert report.rows[-1].agreement == 1.0 and report.rows[-1].own_agreement == 1.0
    assert report.rows[0].agreement < 0.5  # a random model's first layer is a poor exit
    assert report.rows[-1].acceptance_rate is None  # self-speculation needs E < L
    assert (report.chunks, report.text_positions, report.own_positions) == (2, 2 * (SEQ_LEN - 1), 16)


def test_replay_equals_greedy_self_speculative_decoding(trained_like):
    loaded = layerskip.load(str(trained_like()))
    chunks = token_chunks(2)
    gen_tokens = 40
    measurements = [measure_chunk(loaded, chunk, gen_tokens) for chunk in chunks]
    costs = draft_costs(loaded.model)
    seen_lengths = set()
    for exit_layer, k in ((1, 5), (2, 3), (3, 1), (3, 5)):
        config = GenerationConfig(generation_strategy="self_speculative", exit_layer=exit_layer, num_speculations=k,
                                  sample=False, ignore_eos=True, max_steps=gen_tokens).resolved(4, {})
        real = [generate_with_config(loaded, chunk, config).stats for chunk in chunks]
        for stats, measurement in zip(real, measurements):
            replay = simulate_greedy_speculation([[bit == "1" for bit in measurement.own_matches[exit_layer - 1]]], k)
            assert replay == dataclasses.replace(stats, seconds=0.0, prompt_tokens=0), (exit_layer, k)
            seen_lengths |= {i for i, count in enumerate(stats.accepted_length_counts) if count}
        row = exits.summarize_exits("m", measurements, costs, k).rows[exit_layer - 1]  # pooled over the chunks
        assert row.acceptance_rate == sum(s.accepted_drafts for s in real) / sum(s.drafted_tokens for s in real)
        assert row.tokens_per_round == sum(s.new_tokens for s in real) / sum(s.rounds for s in real)
    assert seen_lengths == set(range(6))  # every accepted length 0..5 occurred: the comparison is not trivial


def test_adapter_replay_equals_greedy_tree_decoding_through_the_adapter(trained_like, tmp_path):
    """The adapter's recorded draft ranks replay decoding with it exactly, for every tree width m (k = 1)."""
    from layerskip.loading.draft_adapter import save_draft_adapter
    from layerskip.model.draft_adapter import DraftAdapter, DraftAdapterConfig

    folder = trained_like()
    base = layerskip.load(str(folder))
    torch.manual_seed(3)
    adapter = DraftAdapter(DraftAdapterConfig(exit_layer=1, hidden_size=base.config.hidden_size, kind="layer",
                                              intermediate_size=48, context=True), base.config)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    save_draft_adapter(adapter, tmp_path / "drafts", dtype=torch.float32)
    loaded = layerskip.load(str(folder), draft_adapter=str(tmp_path / "drafts"))
    chunks, gen_tokens = token_chunks(3), 30
    measurements = [measure_chunk(loaded, chunk, gen_tokens) for chunk in chunks]
    rows = exits.summarize_adapter(measurements, draft_cost=0.3)
    assert [row.candidates for row in rows] == [1, 2, 3, 4]
    for row in rows:
        config = GenerationConfig(generation_strategy="self_speculative", exit_layer=1, num_speculations=1,
                                  draft_candidates=row.candidates, sample=False, ignore_eos=True,
                                  max_steps=gen_tokens).resolved(4, loaded.defaults)
        real = [generate_with_config(loaded, chunk, config).stats for chunk in chunks]
        assert all(stats.drafted_tokens for stats in real)  # drafts went through the adapter
        assert row.acceptance_rate == sum(s.accepted_drafts for s in real) / sum(s.drafted_tokens for s in real)
        assert row.tokens_per_round == sum(s.new_tokens for s in real) / sum(s.rounds for s in real)
    assert rows[0].acceptance_rate < rows[-1].acceptance_rate  # the candidates were accepted where drafts were not
    report = exits.format_report(analyze_exits(loaded, chunks, gen_tokens=gen_tokens, progress=False))
    assert "draft adapter at exit layer 1" in report and f"{100 * rows[1].own_agreement:.1f}%" in report


def test_replay_by_hand():
    stats = simulate_greedy_speculation([[True, False, False, True, True, True, False, True]], 2)
    # rounds: 1 of 2 accepted | 0 of 2 | 2 of 2 | 0 of 1 (one token left after it) | no draft, the last token
    assert stats == GenerationStats(rounds=5, new_tokens=8, drafted_tokens=7, accepted_drafts=3, draft_forwards=7,
                                    verify_forwards=5, accepted_length_counts=[2, 1, 1])
    assert estimated_speedup(stats, 0.5) == pytest.approx(8 / (7 * 0.5 + 5))


def test_draft_costs_follow_weight_bytes(tiny_checkpoint):
    folder, hf = tiny_checkpoint()
    costs = draft_costs(layerskip.load(str(folder)).model)
    config = hf.config
    layer = sum(p.numel() for p in hf.model.layers[0].parameters())
    head = config.vocab_size * config.hidden_size + config.hidden_size
    assert costs == pytest.approx([(l * layer + head) / (4 * layer + head) for l in range(1, 5)])
    assert costs[-1] == pytest.approx(1.0)


def test_compare_writes_both_models_to_csv_and_plot_and_resumes(tiny_checkpoint, trained_like, tmp_path, monkeypatch):
    before, _ = tiny_checkpoint("before")
    after = trained_like("after")
    data = tmp_path / "data.jsonl"
    write_token_jsonl(data, token_chunks(3, length=60))  # 180 tokens: 4 chunks of 40
    output = tmp_path / "out"
    options = dict(text_field="ids", seq_len=SEQ_LEN, num_samples=2, gen_tokens=12, num_speculations=3, progress=False)
    reports = run_exit_analysis([str(before), str(after)], [str(data)], output, **options)
    assert [r.model for r in reports] == ["before", "after"]
    assert reports[1].rows[0].acceptance_rate > reports[0].rows[0].acceptance_rate
    rows = list(csv.DictReader((output / "exits.csv").open()))
    assert [(r["model"], int(r["layer"])) for r in rows] == [(m, l) for m in ("before", "after") for l in range(1, 5)]
    for row, expected in zip(rows, [row for report in reports for row in report.rows]):
        assert float(row["agreement"]) == pytest.approx(expected.agreement)
        assert float(row["perplexity"]) == pytest.approx(expected.perplexity)
        assert row["acceptance_rate"] == ("" if expected.acceptance_rate is None else str(expected.acceptance_rate))
    assert (output / "exits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labelled = [[line for line in axes.get_lines() if not line.get_label().startswith("_")]
                for axes in exit_figure(reports).axes]
    single = [[line for line in axes.get_lines() if not line.get_label().startswith("_")]
              for axes in exit_figure(reports[:1]).axes]
    assert [len(lines) for lines in labelled] == [2 * len(lines) for lines in single] == [4, 2, 2]
    assert {line.get_linestyle() for line in labelled[1]} == {"-", "--"}

    records = sorted((output / "measurements").glob("*.jsonl"))
    assert [len(path.read_text().splitlines()) for path in records] == [3, 3]  # settings + 2 chunks each
    with records[0].open("a") as sink:
        sink.write('{"digest": "cut by an interrup')
    measured = []
    real_measure = exits.measure_chunk
    monkeypatch.setattr(exits, "measure_chunk", lambda *a: measured.append(1) or real_measure(*a))
    again = run_exit_analysis([str(before), str(after)], [str(data)], output, **options)
    assert not measured and again == reports
    assert [json.loads(line) for line in records[0].read_text().splitlines()]  # the cut line is gone
    grown = run_exit_analysis([str(before), str(after)], [str(data)], output, **{**options, "num_samples": 3})
    assert len(measured) == 2 and [r.chunks for r in grown] == [3, 3]  # one new chunk per model
    run_exit_analysis([str(before)], [str(data)], output, **{**options, "gen_tokens": 5})
    assert len(measured) == 4 and len(list((output / "measurements").glob("before-*.jsonl"))) == 2  # new settings


def test_text_sets_from_files_folders_globs_and_jsonl(tiny_checkpoint, tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.md").write_text("alpha")
    (tmp_path / "docs" / "sub" / "b.py").write_text("beta")
    (tmp_path / "docs" / "skip.bin").write_text("not text")
    (tmp_path / "c.txt").write_text("gamma")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "delta"}) + "\n\n" + json.dumps({"text": [1, 2]}) + "\n")
    assert read_documents([str(tmp_path / "docs"), f"{tmp_path / 'c.txt'},{tmp_path / 'd.jsonl'}"]) == \
        ["alpha", "beta", "gamma", "delta", [1, 2]]
    assert read_documents([str(tmp_path / "docs" / "**" / "*.py")]) == ["beta"]

    class CharacterTokenizer:
        def encode(self, text):
            return [ord(char) % 97 for char in text]

    folder, _ = tiny_checkpoint()
    loaded = dataclasses.replace(layerskip.load(str(folder)), tokenizer=CharacterTokenizer())
    chunks = make_chunks(loaded, ["abcdefg", [5, 6, 7]], seq_len=3)
    assert chunks == [[0, 1, 2], [3, 4, 5], [6, 5, 6]]  # the short tail [7] is dropped
    subset = make_chunks(loaded, ["abcdefg", [5, 6, 7]], seq_len=3, num_samples=2, seed=3)
    assert len(subset) == 2 and set(map(tuple, subset)) <= set(map(tuple, chunks))
    assert subset == make_chunks(loaded, ["abcdefg", [5, 6, 7]], seq_len=3, num_samples=2, seed=3)


def test_user_errors(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint()
    model = str(folder)
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "wrong.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    write_token_jsonl(tmp_path / "short.jsonl", [[1, 2, 3]])
    write_token_jsonl(tmp_path / "ids.jsonl", token_chunks(1, length=250))
    (tmp_path / "words.txt").write_text("some words")
    cases = [([str(tmp_path / "missing.txt")], {}, "no such file"),
             ([str(tmp_path / "missing" / "*.py")], {}, "no files match"),
             ([str(tmp_path / "empty")], {}, "holds no text files"),
             ([str(tmp_path / "blank.txt")], {}, "text set is empty"),
             ([str(tmp_path / "wrong.jsonl")], {}, "no field 'text'.*body"),
             ([str(tmp_path / "short.jsonl")], {"text_field": "ids"}, "fewer than --seq_len"),
             ([str(tmp_path / "ids.jsonl")], {"text_field": "ids", "seq_len": 250, "gen_tokens": 64}, "context of 256"),
             ([str(tmp_path / "words.txt")], {}, "ships no tokenizer"),
             ([str(tmp_path / "ids.jsonl")], {"text_field": "ids", "num_samples": 0}, "--num_samples must be at least")]
    for paths, options, message in cases:
        with pytest.raises(LayerSkipError, match=message):
            run_exit_analysis([model], paths, tmp_path / "out", progress=False, **options)
