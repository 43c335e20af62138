"""lm-evaluation-harness on our engine, end to end on a tiny model with a character-level tokenizer.

A task folder written here (generation, sampled generation, multiple choice, rolling log-likelihood)
runs through lm-eval; every expected score is computed by hand from the tiny model's own logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from conftest import make_hf_model

import layerskip
from layerskip.api import generate_with_config
from layerskip.cli import main
from layerskip.eval import harness
from layerskip.eval.harness import LayerSkipLM, evaluate, load_tasks
from layerskip.generation import GenerationConfig

SPECIALS = ["<unk>", "<s>", "</s>"]
CHARS = ["\n"] + [chr(code) for code in range(32, 127) if chr(code) not in "`~"]  # 3 + 94 = the tiny vocabulary
BOS, EOS = 1, 2
EXIT = 2
GEN_QUESTIONS = ["ab", "cd?", "xyz", "12+3"]
MC_QUESTIONS = [("sky", ["blue", "red", "green"]), ("cat", ["meow", "woof", "moo"]),
                ("two", ["2", "22", "two!"]), ("sun", ["hot", "cold", "wet"])]
ROLLING_TEXTS = ["the quick brown fox", "Hello, world. 123"]
REPO = Path(__file__).resolve().parents[1]


def encode(text: str) -> list[int]:
    return [len(SPECIALS) + CHARS.index(char) for char in text]


def decode(ids: list[int]) -> str:
    return "".join(CHARS[i - len(SPECIALS)] for i in ids if i >= len(SPECIALS))


def save_char_tokenizer(folder: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + CHARS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            clean_up_tokenization_spaces=False).save_pretrained(folder)


def greedy_text(model: Any, prompt: list[int], max_new: int, stop: str) -> str:
    """Plain greedy decoding, the whole sequence through every layer at every step, no cache."""
    new: list[int] = []
    for _ in range(max_new):
        token = int(model(torch.tensor([prompt + new]))[0, -1].argmax())
        if token == EOS:
            break
        new.append(token)
        if stop in decode(new):
            break
    return decode(new).split(stop)[0]


def loglikelihood(model: Any, context: list[int], continuation: list[int], exit_layer: int | None) -> float:
    """Sum of log-softmax of model.forward(ids, exit_layer=...) at the continuation's tokens."""
    logits = model(torch.tensor([context + continuation[:-1]]), exit_layer=exit_layer)[0, len(context) - 1:]
    return float(torch.log_softmax(logits, dim=-1)[torch.arange(len(continuation)), continuation].sum())


def write_task(folder: Path, name: str, rows: list[dict[str, Any]], **config: Any) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **config}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))


@pytest.fixture(scope="module")
@torch.inference_mode()
def bench(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The tiny checkpoint, its task folder, and every expected value computed by hand."""
    root = tmp_path_factory.mktemp("harness")
    folder = root / "tiny"
    make_hf_model().save_pretrained(folder)
    save_char_tokenizer(folder)
    model = layerskip.load(str(folder)).model

    gen_prompts = [f"Q: {question}\nA:" for question in GEN_QUESTIONS]
    greedy = [greedy_text(model, [BOS] + encode(prompt), 6, "\n") for prompt in gen_prompts]
    assert all(text.strip() for text in greedy), "the tiny model must answer something for exact match to mean much"
    answers = [text.strip() if i % 2 == 0 else "nope" for i, text in enumerate(greedy)]  # half of them right

    def choice_lls(exit_layer: int | None) -> list[list[float]]:
        return [[loglikelihood(model, [BOS] + encode(f"Q: {question}\nA:"), encode(" " + choice), exit_layer)
                 for choice in choices] for question, choices in MC_QUESTIONS]

    full, early = choice_lls(None), choice_lls(EXIT)
    labels = [max(range(3), key=lls.__getitem__) if i % 2 == 0 else (max(range(3), key=lls.__getitem__) + 1) % 3
              for i, lls in enumerate(full)]

    def mc_scores(lls_per_doc: list[list[float]]) -> tuple[float, float]:
        acc = [max(range(3), key=lls.__getitem__) == label for lls, label in zip(lls_per_doc, labels)]
        norm = [max(range(3), key=lambda c: lls[c] / len(choices[c])) == label
                for lls, label, (_, choices) in zip(lls_per_doc, labels, MC_QUESTIONS)]
        return sum(acc) / len(acc), sum(norm) / len(norm)

    def rolling_lls(exit_layer: int | None) -> list[float]:
        return [loglikelihood(model, [BOS], encode(text), exit_layer) for text in ROLLING_TEXTS]

    tasks = root / "tasks"
    tasks.mkdir()
    write_task(tasks, "tiny_gen", [{"question": q, "answer": a} for q, a in zip(GEN_QUESTIONS, answers)],
               output_type="generate_until", doc_to_text="Q: {{question}}\nA:", doc_to_target="{{answer}}",
               generation_kwargs={"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
               metric_list=[{"metric": "exact_match", "regexes_to_ignore": ["^\\s+", "\\s+$"]}])
    write_task(tasks, "tiny_sampled", [{"question": q} for q in GEN_QUESTIONS],
               output_type="generate_until", doc_to_text="Q: {{question}}\nA:", doc_to_target="x",
               generation_kwargs={"until": ["e", "\n"], "max_gen_toks": 5, "do_sample": True, "temperature": 0.8,
                                  "top_k": 7}, metric_list=[{"metric": "exact_match"}])
    write_task(tasks, "tiny_mc", [{"question": q, "choices": c, "label": label}
                                  for (q, c), label in zip(MC_QUESTIONS, labels)],
               output_type="multiple_choice", doc_to_text="Q: {{question}}\nA:", doc_to_choice="{{choices}}",
               doc_to_target="{{label}}", metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    write_task(tasks, "tiny_rolling", [{"text": text} for text in ROLLING_TEXTS],
               output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
               metric_list=[{"metric": "word_perplexity"}])
    (tasks / "tiny_absent.yaml").write_text(yaml.safe_dump(
        {"task": "tiny_absent", "dataset_path": "layerskip-tests/no-such-dataset", "test_split": "test",
         "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "{{c}}", "doc_to_target": 0}))
    return SimpleNamespace(root=root, folder=folder, tasks=tasks, model=model, gen_prompts=gen_prompts, greedy=greedy,
                           answers=answers, full=full, early=early, full_scores=mc_scores(full),
                           early_scores=mc_scores(early), rolling_full=rolling_lls(None),
                           rolling_early=rolling_lls(EXIT))


def samples_by_doc(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(samples, key=lambda sample: sample["doc_id"])


def logprobs(sample: dict[str, Any]) -> list[float]:
    """Each request's log-likelihood from a logged sample (tuples in memory, strings once saved)."""
    return [float(response[0][0] if isinstance(response[0], (list, tuple)) else response[0])
            for response in sample["resps"]]


def test_cli_runs_all_request_types_and_saves_lm_eval_files(bench, capsys):
    output = bench.root / "cli"
    code = main(["eval", "--model", str(bench.folder), "--include_path", str(bench.tasks),
                 "--tasks", "tiny_gen,tiny_sampled", "tiny_mc", "tiny_rolling", "--log_samples",
                 "--output_dir", str(output)])
    out = capsys.readouterr().out
    assert code == 0
    folder = output / "eval" / str(bench.folder).replace("/", "__")
    [results_file] = folder.glob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "layerskip"
    assert results["config"]["model_args"]["pretrained"] == str(bench.folder)
    scores = results["results"]
    assert scores["tiny_gen"]["exact_match,none"] == pytest.approx(sum(
        g.strip() == a for g, a in zip(bench.greedy, bench.answers)) / len(bench.answers))
    assert scores["tiny_gen"]["exact_match,none"] == 0.5
    assert (scores["tiny_mc"]["acc,none"], scores["tiny_mc"]["acc_norm,none"]) == pytest.approx(bench.full_scores)

    samples = {task: samples_by_doc([json.loads(line) for line in next(folder.glob(f"samples_{task}_*.jsonl"))
                                     .read_text().splitlines()])
               for task in ("tiny_gen", "tiny_sampled", "tiny_mc", "tiny_rolling")}
    assert [sample["resps"][0][0] for sample in samples["tiny_gen"]] == bench.greedy
    assert [logprobs(sample) for sample in samples["tiny_mc"]] == [pytest.approx(lls, abs=1e-4) for lls in bench.full]
    assert [logprobs(sample)[0] for sample in samples["tiny_rolling"]] == pytest.approx(bench.rolling_full, abs=1e-4)

    # The sampled task's own settings (stop words, budget, temperature, top-k) reach the engine.
    loaded = layerskip.load(str(bench.folder))
    config = GenerationConfig(sample=True, temperature=0.8, top_k=7, top_p=1.0, max_steps=5, seed=42,
                              stop_words=["e", "\n"])
    assert [sample["resps"][0][0] for sample in samples["tiny_sampled"]] == [
        generate_with_config(loaded, [BOS] + encode(prompt), config).text for prompt in bench.gen_prompts]

    speed = results["config"]["layerskip"]["speed"]
    assert set(speed) == {"tiny_gen", "tiny_sampled"}
    assert speed["tiny_gen"]["generations"] == len(GEN_QUESTIONS) and speed["tiny_gen"]["tokens_per_second"] > 0
    assert speed["tiny_gen"]["acceptance_rate"] is None
    assert "tiny_mc" in out and "tokens/s" in out


def test_lm_eval_registry_scores_with_the_early_exit(bench):
    from lm_eval import simple_evaluate

    results = simple_evaluate(model="layerskip", model_args={"pretrained": str(bench.folder), "exit_layer": EXIT,
                                                             "batch_size": "auto"},
                              tasks=["tiny_mc", "tiny_rolling"], task_manager=harness.task_manager(str(bench.tasks)),
                              log_samples=True)
    mc = samples_by_doc(results["samples"]["tiny_mc"])
    assert [logprobs(sample) for sample in mc] == [pytest.approx(lls, abs=1e-4) for lls in bench.early]
    assert all(early != pytest.approx(full, abs=1e-2) for early, full in zip(bench.early, bench.full))
    scores = results["results"]["tiny_mc"]
    assert (scores["acc,none"], scores["acc_norm,none"]) == pytest.approx(bench.early_scores)
    rolling = samples_by_doc(results["samples"]["tiny_rolling"])
    assert [logprobs(sample)[0] for sample in rolling] == pytest.approx(bench.rolling_early, abs=1e-4)
    assert results["config"]["layerskip"]["loglikelihood_layers"] == EXIT


def test_self_speculative_generation_equals_greedy_and_scores_with_the_full_model(bench):
    lm = LayerSkipLM(str(bench.folder), generation_strategy="self_speculative", exit_layer=EXIT, num_speculations=3)
    results, folder = evaluate(lm, load_tasks(["tiny_gen", "tiny_mc"], bench.tasks), log_samples=True)
    assert folder is None
    generated = [sample["resps"][0][0] for sample in samples_by_doc(results["samples"]["tiny_gen"])]
    assert generated == bench.greedy
    mc = samples_by_doc(results["samples"]["tiny_mc"])
    assert [logprobs(sample) for sample in mc] == [pytest.approx(lls, abs=1e-4) for lls in bench.full]
    speed = lm.speed_report()["tiny_gen"]
    assert speed["drafted_tokens"] > 0 and 0 <= speed["acceptance_rate"] <= 1


def test_request_settings_follow_lm_eval_conventions(bench):
    lm = LayerSkipLM(str(bench.folder), stop_words=["!"])
    config = lm.request_config({"until": "x", "max_new_tokens": 7, "temperature": 0.5})
    assert (config.sample, config.temperature, config.max_steps, config.stop_words) == (True, 0.5, 7, ["!", "x"])
    assert not lm.request_config({"do_sample": False, "temperature": 0.9}).sample
    assert not lm.request_config({"until": ["\n"]}).sample
    config = lm.request_config({"do_sample": True, "top_p": 0.5, "top_k": 3, "num_beams": 1}, repeat=2)
    assert (config.sample, config.temperature, config.top_p, config.top_k, config.seed) == (True, 1.0, 0.5, 3, 44)
    assert lm.request_config({}).max_steps == 256


@pytest.mark.parametrize("arguments, message", [
    (["--tasks", "tiny_mcq"], "unknown task(s) tiny_mcq (close: tiny_mc"),
    (["--tasks", "tiny_absent"], "task 'tiny_absent': its data could not be loaded"),
    (["--tasks", "tiny_mc", "--include_path", "/no/such/folder"], "--include_path /no/such/folder: no such folder"),
    (["--tasks", "tiny_mc", "--limit", "0"], "--limit must be positive"),
    (["--tasks", "tiny_mc", "--batch_size", "0"], "--batch_size must be a positive integer or 'auto'"),
])
def test_errors_are_one_line(bench, capsys, monkeypatch, arguments, message):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = main(["eval", "--model", str(bench.folder), "--include_path", str(bench.tasks), *arguments])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("layerskip: error: ") and message in err and err.count("\n") == 1


def test_shipped_local_tasks_load_offline_from_any_folder(monkeypatch, tmp_path):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    manager = TaskManager(include_path=str(REPO / "benchmarks" / "tasks"), include_defaults=False)
    tasks = manager.load(["layerskip_local"])["tasks"]
    sizes = {name: len(task.test_docs()) for name, task in tasks.items()}
    assert sizes == {"layerskip_local_qa": 30, "layerskip_local_lists": 12, "layerskip_local_mc": 20}
    for doc in tasks["layerskip_local_mc"].test_docs():
        assert 0 <= doc["label"] < len(doc["choices"])
    assert len(tasks["layerskip_local_qa"].fewshot_docs()) == 3
