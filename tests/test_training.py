"""Training: layer dropout, early-exit loss weights, curricula, data, LoRA, the recipe loop and its checkpoints."""

from __future__ import annotations

import csv
import gzip
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import layerskip
from layerskip.errors import LayerSkipError
from layerskip.loading.hf_folder import build_model, load_state_dict, read_config
from layerskip.training import load_config, merge_lora, train
from layerskip.training.config import DataConfig, DataSource
from layerskip.training.curriculum import Gradual, Rotational, make_curriculum
from layerskip.training.data import PackedSequences, tokenize_sources
from layerskip.training.distributed import setup_distributed
from layerskip.training.early_exit_loss import ExitTerm, Head, exit_losses, exit_scales, exit_weights
from layerskip.training.layer_dropout import LayerDropout, layer_shape, step_scale
from layerskip.training.lora import add_lora, lora_disabled, save_adapter
from layerskip.training.model import TrainingModel
from layerskip.training.trainer import Run

CORPUS = ["def add(a, b):\n    return a + b\n", "the cat sat on the mat. the dog sat on the log.\n",
          "for i in range(10):\n    print(i * i)\n", "class Point:\n    x: int\n    y: int\n"] * 6


# ---- layer dropout --------------------------------------------------------------------------------------

def test_layer_dropout_rates_per_layer_and_step():
    ln2 = math.log(2)
    assert layer_shape("exp", 5).tolist() == pytest.approx([math.exp(layer * ln2 / 4) - 1 for layer in range(5)])
    assert layer_shape("exp", 5)[[0, -1]].tolist() == [0.0, 1.0]
    assert layer_shape("linear", 5).tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert layer_shape("uniform", 5).tolist() == [1.0] * 5
    assert step_scale("constant", 3, 10) == 1.0
    assert [step_scale("exp", t, 5) for t in (0, 2, 4)] == pytest.approx([0.0, math.sqrt(2) - 1, 1.0])
    dropout = LayerDropout(5, 0.2, layer_shape_name="exp", step_shape_name="exp", total_steps=5)
    expected = [(math.sqrt(2) - 1) * (math.exp(layer * ln2 / 4) - 1) * 0.2 for layer in range(5)]
    assert dropout.rates(2).tolist() == pytest.approx(expected)


def test_layer_dropout_masks_per_sample_reproducible_and_rank_independent():
    dropout = LayerDropout(6, 0.5, layer_shape_name="linear", seed=3)
    masks = dropout.keep_masks(7, 20000)
    assert masks.shape == (6, 20000) and masks.dtype == torch.bool
    drop_rates = 1 - masks.double().mean(dim=1)
    assert drop_rates.tolist() == pytest.approx(dropout.rates(7).tolist(), abs=0.015)
    assert masks[0].all()  # D(0) = 0: the first layer is never skipped
    assert not (masks[-1] == masks[-1][0]).all()  # per sample, not per batch
    # Another rank (another object, same seed) draws the same matrix; another step draws another one.
    assert torch.equal(LayerDropout(6, 0.5, layer_shape_name="linear", seed=3).keep_masks(7, 20000), masks)
    assert not torch.equal(dropout.keep_masks(8, 20000), masks)
    assert LayerDropout(6, 0.0).keep_masks(0, 50).all()


def test_dropped_sample_passes_through_the_layer_unchanged(tiny_checkpoint):
    folder, _ = tiny_checkpoint()
    model = build_model(read_config(folder), load_state_dict(folder), dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, dims=1)
    keep = [[True, True], [False, True], [True, True], [True, False]]  # sample 0 skips layer 1, sample 1 layer 3
    _, metrics = TrainingModel(model)(ids, labels, keep, [0, 0, 0, 1.0])
    with torch.no_grad():
        cos, sin = model.rope(0, 12, torch.float32)
        rows = []
        for sample in range(2):
            hidden = model.embed(ids[sample:sample + 1])
            for index, layer in enumerate(model.layers):
                if keep[index][sample]:
                    hidden = layer(hidden, cos, sin, 0, None)
            rows.append(hidden)
        expected = torch.nn.functional.cross_entropy(model.head(torch.cat(rows)).flatten(0, 1), labels.flatten())
    assert metrics[3].item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics[:3].isnan().all()  # only the enabled exit was computed


# ---- early-exit loss --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, expected", [
    ("sum_l", [0, 0.5, 1.5, 3 + 0.5 * 3]),  # e(l) = 0.5 * (0 + ... + l); e(3) = 3 + 0.5 * (0 + 1 + 2)
    ("l", [0, 0.5, 1.0, 3 + 0.5 * 2]),
    ("inv_l", [0.5, 0.25, 0.5 / 3, 3 + 0.5 / 3]),
    ("uniform", [0.5, 0.5, 0.5, 3.5]),
])
def test_exit_scales_hand_computed(shape, expected):
    assert exit_scales(4, shape, 0.5).tolist() == pytest.approx(expected)


def test_exit_weights_normalise_over_enabled_exits():
    scales = exit_scales(4, "sum_l", 0.5)  # [0, 0.5, 1.5, 4.5]
    assert exit_weights(scales, torch.ones(4, dtype=torch.bool)).tolist() == pytest.approx(
        [0, 0.5 / 6.5, 1.5 / 6.5, 4.5 / 6.5])
    assert exit_weights(scales, torch.tensor([False, True, False, True])).tolist() == pytest.approx(
        [0, 0.1, 0, 0.9])
    # L = 2 with the paper's e_scale: e(0) = 0, e(1) = 1
    assert exit_scales(2, "sum_l", 0.1).tolist() == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_chunked_exit_losses_equal_plain_autograd(autocast):
    torch.manual_seed(0)
    norm, teacher_norm = torch.nn.RMSNorm(8), torch.nn.RMSNorm(8).requires_grad_(False)
    weight, teacher_weight = torch.nn.Parameter(torch.randn(11, 8)), torch.randn(11, 8)
    hiddens = [torch.randn(3, 5, 8, requires_grad=True) for _ in range(2)]
    teacher_hidden = torch.randn(3, 5, 8)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 0] = -100
    mask = (labels != -100).flatten()
    weights = [(0.7, 1.3), (0.4, 0.0)]  # (CE, KL) per exit: the second exit's KL is only a metric

    def plain():
        target = torch.log_softmax((teacher_norm(teacher_hidden) @ teacher_weight.t()).float().flatten(0, 1), -1)
        total, metrics = 0.0, []
        for hidden, (ce_weight, kl_weight) in zip(hiddens, weights):
            logits = (norm(hidden) @ weight.t()).float().flatten(0, 1)
            kl = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), target, log_target=True, reduction="none")
            kl = (kl.sum(-1) * mask).sum() / mask.sum()
            ce = torch.nn.functional.cross_entropy(logits, labels.flatten(), ignore_index=-100)
            total = total + ce_weight * ce + kl_weight * kl
            agreement = ((logits.argmax(-1) == target.argmax(-1)) & mask).sum() / mask.sum()
            metrics.append([ce.item(), kl.item(), agreement.item()])
        return total, torch.tensor(metrics)

    def chunked(rows):
        terms = [ExitTerm(hidden, *w) for hidden, w in zip(hiddens, weights)]
        return exit_losses(Head(norm, weight), terms, labels, chunk_rows=rows,
                           teacher=(Head(teacher_norm, teacher_weight), teacher_hidden))

    results = []
    for run in (plain, lambda: chunked(0), lambda: chunked(4)):
        for tensor in (*hiddens, weight, norm.weight):
            tensor.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, metrics = run()
        loss.backward()
        results.append([loss.item(), metrics, *(h.grad.clone() for h in hiddens), weight.grad.clone(),
                        norm.weight.grad.clone()])
    tolerance = 2e-2 if autocast else 1e-5
    for other in results[1:]:
        assert other[0] == pytest.approx(results[0][0], rel=tolerance)
        assert torch.allclose(other[1], results[0][1], rtol=tolerance, atol=tolerance)
        for got, expected in zip(other[2:], results[0][2:], strict=True):
            assert torch.allclose(got, expected, rtol=tolerance, atol=tolerance)
    without_teacher = exit_losses(Head(norm, weight), [ExitTerm(hiddens[0], 1.0)], labels)[1]
    assert without_teacher[0, 1:].isnan().all() and without_teacher[0, 0].item() == pytest.approx(results[0][1][0, 0].item(), rel=tolerance)


# ---- curricula --------------------------------------------------------------------------------------------

def exits_of(curriculum) -> list[int]:
    return curriculum.enabled_exits().nonzero().flatten().tolist()


def test_rotational_curriculum_shifts_each_step_and_resumes():
    curriculum = Rotational(6, rotation=3)
    seen = []
    for _ in range(4):
        seen.append(exits_of(curriculum))
        curriculum.step()
    assert seen == [[2, 5], [1, 4, 5], [0, 3, 5], [2, 5]]
    resumed = Rotational(6, rotation=3)
    resumed.load_state_dict(curriculum.state_dict())
    for _ in range(3):
        assert exits_of(resumed) == exits_of(curriculum)
        resumed.step(), curriculum.step()


def test_gradual_curriculum_adds_exits_from_the_top_and_resumes():
    curriculum = make_curriculum("gradual", 4, total_steps=16)  # one more exit every 16 / (2 * 4) = 2 steps
    assert isinstance(curriculum, Gradual)
    seen = []
    for _ in range(3):
        seen.append(exits_of(curriculum))
        curriculum.step()
    state = curriculum.state_dict()
    resumed = make_curriculum("gradual", 4, total_steps=16)
    resumed.load_state_dict(state)
    for _ in range(5):
        seen.append(exits_of(resumed))
        resumed.step()
    assert seen == [[3], [3], [2, 3], [2, 3], [1, 2, 3], [1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    with pytest.raises(ValueError):
        Rotational(4, 2).load_state_dict(state)


# ---- config and data ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1e-4"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["steps=many"], "config key 'steps' must be int, got 'many'"),
    (["layer_dropout.layer_shape=cubic"], "'layer_dropout.layer_shape' must be one of exp, linear, uniform"),
    (["early_exit.curriculum=random"], "'early_exit.curriculum' must be one of"),
    (["lora.enabled=maybe"], "'lora.enabled' must be bool"),
    (["steps"], "must look like key=value"),
    ([], "'data.sources' must be at least one source"),
])
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(LayerSkipError) as error:
        load_config(None, (["data.sources=x.txt"] if overrides else []) + overrides)
    assert message in str(error.value)


def test_recipes_and_overrides_load():
    recipes = Path(__file__).parent.parent / "recipes"
    paper = load_config(recipes / "continual_pretraining_paper.yaml")
    assert (paper.layer_dropout.p_max, paper.early_exit.e_scale, paper.early_exit.rotation) == (0.1, 0.2, 8)
    smol = load_config(recipes / "smollm2_135m_layerskip.yaml", ["optim.lr=3e-4", "data.sources=notes.txt"])
    assert smol.lora.enabled and smol.optim.lr == 3e-4
    assert [s.path for s in smol.data.sources] == ["notes.txt"]


def test_data_sources_read_text_code_gzip_jsonl_and_datasets(tmp_path):
    import datasets

    code = tmp_path / "code"
    (code / "pkg").mkdir(parents=True)
    (code / "pkg" / "a.py").write_text("x = 1\n")
    (code / "b.bin").write_bytes(b"\x00\x01binary")
    (code / "notes.txt.gz").write_bytes(gzip.compress(b"zipped"))
    (tmp_path / "records.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n\n"
                                            + json.dumps({"text": "again"}) + "\n")
    (tmp_path / "ids.jsonl").write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n")
    datasets.Dataset.from_dict({"body": ["from datasets"]}).save_to_disk(str(tmp_path / "saved"))

    class CharTokenizer:  # one id per character, BOS 1, EOS 2
        bos_token_id, eos_token_id, name_or_path = 1, 2, "chars"

        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [[3 + ord(c) % 90 for c in text] for text in texts]}

        def __len__(self):
            return 93

    config = DataConfig(sources=[DataSource(path=str(code)), DataSource(path=str(tmp_path / "records.jsonl")),
                                 DataSource(path=str(tmp_path / "ids.jsonl"), field="input_ids"),
                                 DataSource(dataset=str(tmp_path / "saved"), field="body")])
    stream = tokenize_sources(config, CharTokenizer(), 97, progress=False).tolist()
    texts = ["zipped", "x = 1\n", "from jsonl", "again"]  # binary file skipped; files in sorted order
    expected = [t for text in texts for t in [1, *[3 + ord(c) % 90 for c in text], 2]] + [5, 6, 7]
    expected += [1, *[3 + ord(c) % 90 for c in "from datasets"], 2]
    assert stream == expected


def test_missing_or_insufficient_data_is_a_clear_error(tmp_path):
    with pytest.raises(LayerSkipError, match="data source '/no/such/dir' does not exist"):
        tokenize_sources(DataConfig(sources=[DataSource(path="/no/such/dir")]), None, 97)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayerSkipError, match="has no files matching"):
        tokenize_sources(DataConfig(sources=[DataSource(path=str(tmp_path / "empty"), glob="*.py")]), None, 97)
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(LayerSkipError, match="ships no tokenizer"):
        tokenize_sources(DataConfig(sources=[DataSource(path=str(tmp_path / "t.txt"))]), None, 97, progress=False)
    with pytest.raises(LayerSkipError, match="fewer than one sequence"):
        PackedSequences(torch.arange(10).numpy(), seq_len=16, seed=0)


def test_packed_order_is_a_function_of_position():
    data = PackedSequences(torch.arange(50).numpy(), seq_len=4, seed=1)  # 10 sequences of 5 tokens
    inputs, labels = data.batch(0, 10)
    assert sorted(inputs[:, 0].tolist()) == list(range(0, 50, 5))  # one epoch visits every sequence once
    assert torch.equal(labels[:, :-1], inputs[:, 1:])
    again = PackedSequences(torch.arange(50).numpy(), seq_len=4, seed=1)
    assert torch.equal(again.batch(7, 6)[0], torch.cat([inputs[7:], data.batch(10, 3)[0]]))


# ---- LoRA ---------------------------------------------------------------------------------------------------

def test_lora_merge_equals_unmerged_adapter_and_peft(tiny_checkpoint, tmp_path):
    folder, hf = tiny_checkpoint()
    config = read_config(folder)
    model = build_model(config, load_state_dict(folder), dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = model(ids)
    torch.manual_seed(0)
    add_lora(model, rank=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
        adapted = model(ids)
        with lora_disabled(model):
            assert torch.equal(model(ids), base_logits)
    assert (adapted - base_logits).abs().max() > 1e-2
    save_adapter(tmp_path / "adapter", {n: p for n, p in model.named_parameters() if "lora_" in n},
                 rank=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"], base_model=str(folder))
    merged_state = merge_lora(load_state_dict(folder), tmp_path / "adapter")
    with torch.no_grad():
        from_state = build_model(config, merged_state, dtype=torch.float32, device="cpu")(ids)
        in_place = merge_lora(layerskip.load(str(folder)).model, tmp_path / "adapter")
        assert (from_state - adapted).abs().max() < 1e-4
        assert (in_place(ids) - adapted).abs().max() < 1e-4
    from peft import PeftModel  # our adapter files are peft's format: transformers + peft agree

    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))(ids).logits
    assert (peft_logits - adapted).abs().max() < 1e-4
    with pytest.raises(LayerSkipError, match="do not exist in this model's layers: choose among"):
        add_lora(model, rank=2, alpha=2, dropout=0.0, targets=["query_key_value"])


# ---- the recipe loop ----------------------------------------------------------------------------------------

def write_tokenizer(folder: Path) -> None:
    """A tiny BPE tokenizer fitting the tiny model's 97-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=97, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def tiny_run(folder: Path, data: Path, output: Path, *extra: str):
    return load_config(None, [f"model={folder}", f"output_dir={output}", f"data.sources={data}",
                              "data.seq_len=16", "data.batch_size=4", "optim.lr=3e-3", "optim.warmup_steps=2",
                              "log_every=1", "layer_dropout.p_max=0.3", "early_exit.rotation=2",
                              "early_exit.loss_chunk_rows=24", "seed=5", *extra])


class _Anything:
    """Equal to every value: a CSV cell whose value a test does not pin (a timing)."""

    def __eq__(self, other):
        return True


ANY = _Anything()


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def tiny_text_model(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint()
    write_tokenizer(folder)
    data = tmp_path / "corpus"
    data.mkdir()
    for index, text in enumerate(CORPUS):
        (data / f"doc{index}.py").write_text(text)
    return folder, data


def test_tiny_run_lowers_early_exit_loss_and_checkpoint_loads(tiny_text_model, tmp_path):
    folder, data = tiny_text_model
    config = tiny_run(folder, data, tmp_path / "out", "steps=12", "early_exit.curriculum=all",
                      "optim.grad_accum=2")
    run = Run(config, setup_distributed("cpu"))
    checkpoint = run.train()
    rows = csv_rows(tmp_path / "out" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    for column in ("loss", "ce_e2", "ce_e4"):  # the mean of the last 3 steps against the first 3
        values = [float(row[column]) for row in rows]
        assert sum(values[-3:]) < 0.7 * sum(values[:3]), column
    assert float(rows[0]["tokens_per_second"]) > 0
    # An HF checkpoint that layerskip.load reads back, tokenizer and all, with the trained weights.
    assert {"model.safetensors", "config.json", "tokenizer.json", "training_state.pt"} <= {
        p.name for p in checkpoint.iterdir()}
    loaded = layerskip.load(str(checkpoint), cpu_kernels="plain")  # torch's kernels, as in training: exact
    assert loaded.tokenizer is not None
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids, exit_layer=2), run.model.eval()(ids, exit_layer=2))


@pytest.mark.parametrize("variant", [[], ["lora.enabled=true", "lora.rank=4", "lora.dropout=0.2",
                                          "early_exit.distill_weight=0.5", "optim.lr=1e-2"]],
                         ids=["full", "lora_distill"])
def test_resume_continues_bit_identically(tiny_text_model, tmp_path, variant):
    folder, data = tiny_text_model
    common = ["steps=4", "save_every=2", "optim.grad_accum=2", "early_exit.curriculum=rotational", *variant]
    straight = train(tiny_run(folder, data, tmp_path / "straight", *common))
    resumed_root = tmp_path / "resumed" / "checkpoints"
    resumed_root.mkdir(parents=True)
    # What an interrupted run leaves behind: its step-2 checkpoint, and metrics past it (which resume drops).
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_0000002", resumed_root / "step_0000002")
    rows = csv_rows(tmp_path / "straight" / "metrics.csv")
    (tmp_path / "resumed" / "metrics.csv").write_text((tmp_path / "straight" / "metrics.csv").read_text())
    resumed = train(tiny_run(folder, data, tmp_path / "resumed", *common))
    assert csv_rows(tmp_path / "resumed" / "metrics.csv") == [
        {**row, "tokens_per_second": ANY} for row in rows]
    weights = "adapter_model.safetensors" if variant else "model.safetensors"
    final = [load_file(path.parent / "checkpoints" / "step_0000004" / weights) if variant else load_file(path / weights)
             for path in (straight, resumed)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])
    if variant:  # LoRA: the merged model is a full checkpoint too
        assert straight.name == "merged" and (straight / "model.safetensors").is_file()
    with pytest.raises(LayerSkipError, match="already has checkpoints \\(step_0000004\\)"):
        train(tiny_run(folder, data, tmp_path / "resumed", *common, "resume=false"))


def test_compiled_layers_train_like_eager_ones(tiny_text_model, tmp_path):
    """compile=true changes the speed only: the same losses (to float32 rounding of fused kernels) and an
    adapter with the same tensor names, with layer dropout's sub-batches and the distillation teacher in play."""
    folder, data = tiny_text_model
    common = ["steps=3", "precision=fp32", "lora.enabled=true", "lora.rank=4", "lora.merge_at_end=false",
              "early_exit.distill_weight=0.5", "early_exit.exit_distill=0.5"]
    results = {}
    for compiled in ("false", "true"):
        run = Run(tiny_run(folder, data, tmp_path / compiled, *common, f"compile={compiled}"), setup_distributed("cpu"))
        output = run.train()
        assert all((layer._compiled_call_impl is not None) == (compiled == "true") for layer in run.model.layers)
        rows = csv_rows(tmp_path / compiled / "metrics.csv")
        results[compiled] = ([float(row["loss"]) for row in rows], load_file(output / "adapter_model.safetensors"))
    (eager_losses, eager_adapter), (compiled_losses, compiled_adapter) = results["false"], results["true"]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled_adapter.keys() == eager_adapter.keys()
    assert all(torch.allclose(compiled_adapter[name], eager_adapter[name], atol=1e-4) for name in eager_adapter)


def test_model_that_cannot_be_trained_is_a_clear_error(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint()
    (tmp_path / "d.jsonl").write_text(json.dumps({"input_ids": list(range(40))}) + "\n")
    base = [f"model={folder}", f"output_dir={tmp_path / 'o'}",
            f"data.sources=[{{path: {tmp_path / 'd.jsonl'}, field: input_ids}}]"]
    with pytest.raises(LayerSkipError, match="fewer than one sequence of data.seq_len \\+ 1 = 513"):
        train(load_config(None, base))
    base.append("data.seq_len=16")
    with pytest.raises(LayerSkipError, match="LoRA target module\\(s\\) attention do not exist"):
        train(load_config(None, [*base, "lora.enabled=true", "lora.targets=[attention]"]))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(LayerSkipError, match="unsupported architecture 'gpt2'"):
        train(load_config(None, base))


def test_train_and_merge_lora_commands(tiny_checkpoint, tmp_path, capsys):
    from layerskip.cli import ArgumentParser
    from layerskip.training.command import add_training_commands

    parser = ArgumentParser(prog="layerskip")
    add_training_commands(parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser))
    args = parser.parse_args(["train", "--config", "r.yaml", "optim.lr=1e-4", "steps=3"])
    assert (args.config, args.overrides) == ("r.yaml", ["optim.lr=1e-4", "steps=3"])

    folder, _ = tiny_checkpoint()
    model = build_model(read_config(folder), load_state_dict(folder), dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    add_lora(model, rank=2, alpha=4, dropout=0.0, targets=["o_proj", "up_proj"])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    save_adapter(tmp_path / "adapter", {n: p for n, p in model.named_parameters() if "lora_" in n},
                 rank=2, alpha=4, dropout=0.0, targets=["o_proj", "up_proj"], base_model=str(folder))
    args = parser.parse_args(["merge-lora", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m")])
    assert args.run(args) == 0 and capsys.readouterr().out.strip() == str(tmp_path / "m")
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (layerskip.load(str(tmp_path / "m")).model(ids) - model(ids)).abs().max() < 1e-4


def test_module_entry_point_reports_errors_on_one_line(tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    folder, _ = tiny_checkpoint()
    for overrides, message in ((["optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
                               (["data.sources=/no/such/data"], "data source '/no/such/data' does not exist")):
        result = subprocess.run([sys.executable, "-m", "layerskip.training", f"model={folder}",
                                 f"output_dir={tmp_path / 'out'}", *overrides],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert result.stderr.startswith("layerskip: error: ") and message in result.stderr


# ---- the embedded default's recipe: fixed exits, distilled exits, generated and capped data ------------------

def test_fixed_curriculum_enables_the_listed_exits_and_refuses_others():
    curriculum = make_curriculum("fixed", 6, exits=[2, 4, 2])
    for _ in range(3):
        assert curriculum.enabled_exits().tolist() == [False, True, False, True, False, True]
        curriculum.step()
    with pytest.raises(LayerSkipError, match="exit layer 6 is outside \\[1, 5\\]"):
        make_curriculum("fixed", 6, exits=[6])
    with pytest.raises(LayerSkipError, match="'early_exit.exits' must be a non-empty list"):
        load_config(None, ["data.sources=x.txt", "early_exit.curriculum=fixed"])


def test_distilled_exit_loss_is_the_kl_to_the_original_final_layer(tiny_checkpoint):
    from layerskip.training.model import Teacher

    folder, _ = tiny_checkpoint()
    model = build_model(read_config(folder), load_state_dict(folder), dtype=torch.float32, device="cpu")
    original = build_model(read_config(folder), load_state_dict(folder), dtype=torch.float32, device="cpu")
    with torch.no_grad():  # the trained model has moved away from the original
        for parameter in model.layers[0].parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(4))
    labels = torch.roll(ids, -1, dims=1)
    keep = [[True, True]] * 4
    module = TrainingModel(model, teacher=Teacher(original), distill_weight=0.5, exit_distill=0.75,
                           loss_chunk_rows=7)
    loss, metrics = module(ids, labels, keep, [0, 0.4, 0, 0.6])
    with torch.no_grad():
        target = torch.log_softmax(original(ids), -1)
        exit_2, final = torch.log_softmax(model(ids, exit_layer=2), -1), torch.log_softmax(model(ids), -1)

        def kl(student):
            return (target.exp() * (target - student)).sum(-1).mean()

        def ce(student):
            return -student.gather(-1, labels[..., None]).mean()

        expected = 0.4 * (0.25 * ce(exit_2) + 0.75 * kl(exit_2)) + 0.6 * ce(final) + 0.5 * kl(final)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics[1].item() == pytest.approx(ce(exit_2).item(), rel=1e-5)
    assert metrics[-1].item() == pytest.approx(kl(final).item(), rel=1e-4)
    agreement = (exit_2.argmax(-1) == target.argmax(-1)).float().mean()
    assert metrics[4 + 1].item() == pytest.approx(agreement.item())  # exit 2's agreement: after the 4 CEs
    assert metrics[4:].isnan().tolist() == [True, False, True, False, False]  # agreements of exits 2 and 4, KL


def test_frozen_weights_stored_in_bfloat16_give_the_autocast_numbers(tiny_checkpoint):
    from layerskip.training.lora import store_frozen_weights_as

    folder, _ = tiny_checkpoint()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    results = []
    for store in (False, True):
        model = build_model(read_config(folder), load_state_dict(folder), dtype=torch.float32, device="cpu")
        torch.manual_seed(0)
        add_lora(model, rank=2, alpha=4, dropout=0.0, targets=["q_proj", "down_proj"])
        if store:
            store_frozen_weights_as(model, torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = TrainingModel(model)(ids, torch.roll(ids, -1, 1), [[True, True]] * 4, [0, 0.5, 0, 0.5])
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for n, p in model.named_parameters() if "lora_A" in n]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_max_tokens_keeps_whole_documents_of_a_source(tmp_path):
    records = tmp_path / "ids.jsonl"
    records.write_text("".join(json.dumps({"input_ids": [i] * 4}) + "\n" for i in range(10)))
    config = DataConfig(sources=[DataSource(path=str(records), field="input_ids", max_tokens=9),
                                 DataSource(path=str(records), field="input_ids", max_tokens=8)])
    # The first source stops at the document that reaches 9 tokens (12), the second exactly at 8.
    assert tokenize_sources(config, None, 97, progress=False).tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [0] * 4 + [1] * 4


def test_frequent_tokens_ranks_ids_by_count():
    from layerskip.training.trainer import frequent_tokens

    stream = torch.tensor([5, 3, 5, 9, 3, 5, 7, 9, 1]).numpy().astype("uint32")
    assert frequent_tokens(stream, 3) == [5, 3, 9]  # 5 three times; 3 and 9 twice (lower id first)
    assert frequent_tokens(stream, 10) == [5, 3, 9, 1, 7]  # ids that never occur are not listed
