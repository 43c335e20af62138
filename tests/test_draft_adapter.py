"""Draft adapters: drafts read the exit through them, outputs stay the base model's, their caches roll back, and
their folders round-trip and are checked against the model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import layerskip
from layerskip.errors import LayerSkipError
from layerskip.generation import BatchEngine, Sampler, SelfSpeculative, Streamer, generate_ids
from layerskip.loading.draft_adapter import CONFIG_FILE, read_draft_adapter, save_draft_adapter
from layerskip.model.draft_adapter import DraftAdapter, DraftAdapterConfig
from layerskip.model.kernels.prepare import prepare_adapter
from conftest import assert_same_greedy_tokens

PROMPTS = [[3, 14, 15, 92, 65], [2, 71, 82, 81, 82, 84, 59, 4, 52], [9]]
SHAPES = [("layer", True), ("layer", False), ("mlp", True), ("mlp", False)]


def random_adapter(model_config, exit_layer: int, kind: str, context: bool, seed: int = 0,
                   scale: float = 0.15) -> DraftAdapter:
    """An adapter away from the identity by `scale`, so that its drafts differ from the plain exit's."""
    torch.manual_seed(seed)
    adapter = DraftAdapter(DraftAdapterConfig(exit_layer=exit_layer, hidden_size=model_config.hidden_size, kind=kind,
                                              intermediate_size=48, context=context), model_config)
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            parameter.add_(torch.randn_like(parameter) * scale)
    return adapter.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_hf_model

    folder = tmp_path_factory.mktemp("tiny")
    make_hf_model(num_hidden_layers=5).save_pretrained(folder)
    return layerskip.load(str(folder))


@pytest.mark.parametrize("kind, context", SHAPES)
def test_greedy_output_with_an_adapter_is_the_base_models(tiny, tmp_path, kind, context):
    save_draft_adapter(random_adapter(tiny.config, 2, kind, context), tmp_path / "drafts", dtype=torch.float32)
    adapted = layerskip.load(str(tiny.folder), draft_adapter=str(tmp_path / "drafts"))
    assert adapted.draft_adapter is not None
    speculative = dict(generation_strategy="self_speculative", exit_layer=2, num_speculations=3, sample=False,
                       max_steps=30)
    accepted = []
    for prompt in PROMPTS:
        reference = layerskip.generate(tiny, prompt_ids=prompt, max_steps=30, sample=False)
        plain = layerskip.generate(tiny, prompt_ids=prompt, **speculative)
        result = layerskip.generate(adapted, prompt_ids=prompt, **speculative)
        assert_same_greedy_tokens(tiny, prompt, reference.token_ids, result.token_ids)
        assert result.settings["draft_adapter"] == "drafts" and "draft_adapter" not in plain.settings
        accepted.append((plain.stats.accepted_length_counts, result.stats.accepted_length_counts))
    assert any(a != b for a, b in accepted)  # the adapter drafted other tokens: the test has power
    # At another exit the adapter does not apply: plain early-exit drafts.
    other = layerskip.generate(adapted, prompt_ids=PROMPTS[0], **{**speculative, "exit_layer": 3})
    assert "draft_adapter" not in other.settings


@pytest.mark.parametrize("kind, context", SHAPES)
@pytest.mark.parametrize("speculations, candidates, prefill_chunk", [(4, 1, 0), (1, 4, 0), (2, 2, 3)])
def test_each_rounds_first_draft_sees_only_verified_states(tiny, kind, context, speculations, candidates,
                                                           prefill_chunk):
    """The adapter's cache and context are rebuilt from the final layer's states of accepted positions (an accepted
    tree alternative's included; a prompt in chunks): every round's first draft equals the adapter run over the
    whole committed sequence at once (float64, exact argmax: no kernel near-ties)."""
    model = layerskip.load(str(tiny.folder), dtype="float32", cpu_kernels="plain").model.double()
    model._rope_table = None
    adapter = random_adapter(tiny.config, 4, kind, context, seed=1, scale=0.05).double()
    strategy = SelfSpeculative(4, speculations, draft_adapter=adapter, draft_candidates=candidates)
    firsts: list[tuple[int, int]] = []

    class FirstDrafts(Streamer):
        def on_draft(self, drafts: list[int]) -> None:
            firsts.append((len(sequence.ctx.tokens), drafts[0]))

    engine = BatchEngine(model, slots=1, capacity=60, prefill_chunk=prefill_chunk)
    with torch.inference_mode():
        sequence = engine.add(PROMPTS[1], strategy, Sampler(sample=False), max_new_tokens=41, streamer=FirstDrafts())
        while not engine.step():
            pass
        tokens = sequence.ctx.tokens
        ids = torch.tensor([tokens])
        exits = model.forward_layers(model.embed(ids), 0, 4)
        finals = model.forward_layers(exits, 4, model.num_layers)
        context_states = torch.cat((torch.zeros_like(finals[:, :1]), finals[:, :-1]), dim=1) if context else None
        cos, sin = model.rope(0, ids.shape[1], exits.dtype)
        cache = adapter.kv_cache(ids.shape[1])
        expected = model.head(adapter(exits, context_states, cos, sin, 0, cache))[0].argmax(-1)
    assert 8 < len(firsts) < 40  # rounds accepted drafts, so caches were rebuilt over several positions
    assert [draft for _, draft in firsts] == [int(expected[length - 1]) for length, _ in firsts]


def test_folder_round_trip_and_stored_settings(tiny, tmp_path):
    adapter = random_adapter(tiny.config, 3, "layer", True)
    defaults = {"generation_strategy": "self_speculative", "exit_layer": 3, "num_speculations": 2,
                "draft_vocab": list(range(96, 40, -1)), "draft_vocab_size": 20}
    save_draft_adapter(adapter, tmp_path / "drafts", defaults=defaults, base_model="tiny")
    loaded = layerskip.load(str(tiny.folder), draft_adapter=str(tmp_path / "drafts"))
    saved = {name: tensor.to(torch.bfloat16).float() for name, tensor in adapter.state_dict().items()}
    assert all(torch.equal(saved[name], tensor) for name, tensor in loaded.draft_adapter.state_dict().items())
    assert json.loads((tmp_path / "drafts" / CONFIG_FILE).read_text())["base_model"] == "tiny"
    # Plain `generate` takes the adapter's settings, its draft vocabulary included.
    result = layerskip.generate(loaded, prompt_ids=PROMPTS[0], max_steps=10, sample=False)
    assert result.settings == {"generation_strategy": "self_speculative", "exit_layer": 3, "num_speculations": 2,
                               "draft_vocab_size": 20, "draft_adapter": "drafts"}
    assert torch.equal(loaded.model.draft_vocab, torch.arange(96, 40, -1))
    # A model folder may name its own adapter; "none" turns it off.
    (tiny.folder / "layerskip.json").write_text(json.dumps({"draft_adapter": str(tmp_path / "drafts")}))
    try:
        assert layerskip.load(str(tiny.folder)).draft_adapter_path == (tmp_path / "drafts").resolve()
        assert layerskip.load(str(tiny.folder), draft_adapter="none").draft_adapter is None
    finally:
        (tiny.folder / "layerskip.json").unlink()


def test_an_adapter_that_does_not_fit_is_a_one_line_error(tiny, tmp_path):
    save_draft_adapter(random_adapter(tiny.config, 2, "mlp", False), tmp_path / "good")
    wider = dataclasses.replace(tiny.config, hidden_size=32, num_attention_heads=2, head_dim=16)
    save_draft_adapter(random_adapter(wider, 2, "mlp", False), tmp_path / "wide")
    deep = json.loads((tmp_path / "good" / CONFIG_FILE).read_text())
    (tmp_path / "deep").mkdir()
    for name in ("draft_adapter.safetensors",):
        (tmp_path / "deep" / name).write_bytes((tmp_path / "good" / name).read_bytes())
    (tmp_path / "deep" / CONFIG_FILE).write_text(json.dumps({**deep, "exit_layer": 5}))
    (tmp_path / "bad_kind").mkdir()
    (tmp_path / "bad_kind" / CONFIG_FILE).write_text(json.dumps({**deep, "kind": "tree"}))
    cases = {"wide": "is for hidden size 32, but the model's is 64", "deep": "reads exit layer 5, outside [1, 4]",
             "bad_kind": "'kind' must be one of layer, mlp", "absent": "is not a draft adapter folder"}
    for name, message in cases.items():
        with pytest.raises(LayerSkipError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
            layerskip.load(str(tiny.folder), draft_adapter=str(tmp_path / name))
        assert "\n" not in str(error.value)
    with pytest.raises(LayerSkipError, match="do not match"):
        (tmp_path / "good" / "draft_adapter.safetensors").write_bytes(
            (tmp_path / "wide" / "draft_adapter.safetensors").read_bytes())
        read_draft_adapter(tmp_path / "good", tiny.config, dtype=torch.float32, device="cpu")


# ---------------------------------------------------------------- training with the model frozen


def draft_recipe(folder, data, output, *extra: str):
    from layerskip.training import load_config

    return load_config(None, [f"model={folder}", f"output_dir={output}",
                              f"data.sources=[{{path: {data}, field: input_ids}}]", "data.seq_len=16",
                              "data.batch_size=4", "optim.lr=3e-3", "optim.warmup_steps=2", "log_every=1",
                              "precision=fp32", "seed=3", "draft_vocab=60", "draft_adapter.enabled=true",
                              "draft_adapter.exit_layer=2", "draft_adapter.intermediate_size=32",
                              "draft_adapter.heldout_sequences=2", *extra])


@pytest.fixture
def token_data(tmp_path):
    generator = torch.Generator().manual_seed(4)
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"input_ids": torch.randint(0, 97, (40,), generator=generator).tolist()}) + "\n"
                            for _ in range(12)))
    return path


def csv_rows(path):
    import csv

    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_training_lowers_the_draft_loss_and_its_adapter_drafts(tiny, tmp_path, token_data):
    from layerskip.training.draft_adapter import train_draft_adapter

    folder = train_draft_adapter(draft_recipe(tiny.folder, token_data, tmp_path / "out", "steps=40"))
    rows = csv_rows(tmp_path / "out" / "metrics.csv")
    losses = [float(row["loss"]) for row in rows]
    assert len(rows) == 40 and sum(losses[-4:]) < 0.7 * sum(losses[:4])
    last = rows[-1]
    assert float(last["heldout_agreement"]) >= 0 and float(last["heldout_plain_exit"]) >= 0
    # The result loads as an adapter of the model, with the ranked vocabulary, and leaves greedy output as it was.
    stored = json.loads((folder / "layerskip.json").read_text())
    assert stored["exit_layer"] == 2 and stored["draft_vocab_size"] == len(stored["draft_vocab"]) <= 60
    adapted = layerskip.load(str(tiny.folder), draft_adapter=str(folder))
    for prompt in PROMPTS:
        reference = layerskip.generate(tiny, prompt_ids=prompt, max_steps=20, sample=False)
        result = layerskip.generate(adapted, prompt_ids=prompt, max_steps=20, sample=False,
                                    generation_strategy="self_speculative")
        assert result.settings["draft_adapter"] == "draft_adapter"
        assert_same_greedy_tokens(tiny, prompt, reference.token_ids, result.token_ids)


def test_training_resumes_bit_identically(tiny, tmp_path, token_data):
    import shutil

    from safetensors.torch import load_file

    from layerskip.training.draft_adapter import train_draft_adapter

    common = ["steps=6", "save_every=3", "draft_adapter.kind=mlp"]
    straight = train_draft_adapter(draft_recipe(tiny.folder, token_data, tmp_path / "straight", *common))
    resumed_root = tmp_path / "resumed" / "checkpoints"
    resumed_root.mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_0000003", resumed_root / "step_0000003")
    # An interrupted state cache resumes too: only its first 2 sequences were written.
    shutil.copytree(tmp_path / "straight" / "data", tmp_path / "resumed" / "data")
    (states,) = (tmp_path / "resumed" / "data").glob("states-*")
    (states / "done.json").write_text(json.dumps({"sequences": 2}))
    resumed = train_draft_adapter(draft_recipe(tiny.folder, token_data, tmp_path / "resumed", *common))
    for name in ("exits.npy", "finals.npy", "targets.npy"):
        first, second = (next((root / "data").glob("states-*")) / name for root in (tmp_path / "straight",
                                                                                     tmp_path / "resumed"))
        assert first.read_bytes() == second.read_bytes()
    weights = [load_file(root / "checkpoints" / "step_0000006" / "draft_adapter" / "draft_adapter.safetensors")
               for root in (tmp_path / "straight", tmp_path / "resumed")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    drop = lambda row: {k: v for k, v in row.items() if k != "tokens_per_second"}
    assert [drop(r) for r in csv_rows(tmp_path / "resumed" / "metrics.csv")] == \
        [drop(r) for r in csv_rows(tmp_path / "straight" / "metrics.csv")][3:]
    assert straight.name == resumed.name == "draft_adapter"


def test_bad_draft_recipes_are_one_line_errors(tiny, tmp_path, token_data):
    from layerskip.model.draft_adapter import ADAPTER_KINDS
    from layerskip.training import config as recipe
    from layerskip.training.draft_adapter import train_draft_adapter

    assert recipe.ADAPTER_KINDS == ADAPTER_KINDS
    for extra, message in [(["draft_adapter.kind=tree"], "'draft_adapter.kind' must be one of layer, mlp"),
                           (["lora.enabled=true"], "'draft_adapter.enabled' must be false with lora.enabled"),
                           (["draft_adapter.exit_layer=5"], r"reads exit layer 5, outside \[1, 4\]"),
                           (["draft_adapter.heldout_sequences=30"], "not more than draft_adapter.heldout_sequences")]:
        with pytest.raises(LayerSkipError, match=message):
            train_draft_adapter(draft_recipe(tiny.folder, token_data, tmp_path / "bad", *extra))


def test_generate_command_takes_an_adapter_and_compares_with_plain_decoding(tiny, tmp_path, capsys):
    from layerskip.cli import main

    save_draft_adapter(random_adapter(tiny.config, 2, "layer", True), tmp_path / "drafts",
                       defaults={"generation_strategy": "self_speculative", "exit_layer": 2, "num_speculations": 3})
    code = main(["generate", "--model", str(tiny.folder), "--draft_adapter", str(tmp_path / "drafts"),
                 "--prompt_ids", "3,14,15", "--max_steps", "12", "--sample", "false", "--ignore_eos",
                 "--output", "json", "--compare_autoregressive"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["settings"]["draft_adapter"] == "drafts"
    comparison = report["comparison"]
    assert comparison["speedup"] == pytest.approx(comparison["tokens_per_second"]
                                                  / comparison["autoregressive_tokens_per_second"])
    plain = layerskip.generate(tiny, prompt_ids=[3, 14, 15], max_steps=12, sample=False, ignore_eos=True)
    assert comparison["identical"] == (report["token_ids"] == plain.token_ids)
    assert_same_greedy_tokens(tiny, [3, 14, 15], plain.token_ids, report["token_ids"])
    code = main(["generate", "--model", str(tiny.folder), "--draft_adapter", str(tmp_path / "nothing"),
                 "--prompt_ids", "3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is not a draft adapter folder" in err


@pytest.mark.parametrize("kind, context", SHAPES)
def test_a_batch_through_one_adapter_decodes_each_row_as_alone(tiny, kind, context):
    """The adapter's layer runs once for all the batch's rows, each in its own row of the adapter's cache."""
    adapter = random_adapter(tiny.config, 2, kind, context, seed=2)
    prepare_adapter(adapter, tiny.model)
    strategy = SelfSpeculative(2, 2, draft_adapter=adapter, draft_candidates=2)
    prompts, limits = PROMPTS + [[60, 61, 62, 63], [7, 7]], [20, 9, 25, 14, 6]
    with torch.inference_mode():
        alone = [generate_ids(tiny.model, prompt, strategy, Sampler(sample=False), max_new_tokens=limit).token_ids
                 for prompt, limit in zip(prompts, limits)]
        engine = BatchEngine(tiny.model, slots=3, capacity=40)
        sequences = dict(engine.each(range(len(prompts)), lambda index: engine.add(
            prompts[index], strategy, Sampler(sample=False), max_new_tokens=limits[index])))
    for index, prompt in enumerate(prompts):
        assert_same_greedy_tokens(tiny, prompt, alone[index], sequences[index].new_tokens)
    assert sum(sequence.stats.drafted_tokens for sequence in sequences.values()) > 0
