"""Loading from sharded folders, GGUF files, the local hub cache and the embedded default; refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import layerskip
from layerskip.errors import LayerSkipError
from conftest import assert_same_greedy_tokens, write_tiny_gguf
from layerskip.loading import resolve_model_folder


def logits_of(loaded, ids):
    with torch.inference_mode():
        return loaded.model(ids)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


IDS = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(5))


def test_sharded_safetensors_with_index(tiny_checkpoint, tmp_path):
    folder, hf = tiny_checkpoint()
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert (logits_of(layerskip.load(str(sharded)), IDS) - hf_logits(hf, IDS)).abs().max() < 1e-4


def write_random_adapter(folder, base, config, *, rank=4, seed=1):
    """A LoRA adapter with random A and B on two projections of every layer (B is zero after real init)."""
    from layerskip.training.lora import save_adapter

    generator = torch.Generator().manual_seed(seed)
    sizes = {"self_attn.q_proj": (config.hidden_size, config.hidden_size),
             "mlp.down_proj": (config.intermediate_size, config.hidden_size)}
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module, (fan_in, fan_out) in sizes.items():
            tensors[f"layers.{layer}.{module}.lora_A.weight"] = 0.2 * torch.randn(rank, fan_in, generator=generator)
            tensors[f"layers.{layer}.{module}.lora_B.weight"] = 0.2 * torch.randn(fan_out, rank, generator=generator)
    save_adapter(folder, tensors, rank=rank, alpha=8.0, dropout=0.0, targets=["q_proj", "down_proj"],
                 base_model=str(base))


def test_adapter_folder_loads_its_base_with_the_adapter_merged(tiny_checkpoint, tmp_path):
    from peft import PeftModel

    from layerskip.bench.engines import HFEngine, LayerSkipEngine
    from layerskip.generation import GenerationConfig

    folder, hf = tiny_checkpoint()
    adapter = tmp_path / "adapter"
    write_random_adapter(adapter, folder, hf.config)
    (adapter / "layerskip.json").write_text(json.dumps({"exit_layer": 3, "num_speculations": 2}))
    loaded = layerskip.load(str(adapter))
    assert loaded.folder == folder and loaded.adapter == adapter
    assert loaded.defaults == {"exit_layer": 3, "num_speculations": 2}
    reference = PeftModel.from_pretrained(hf, str(adapter)).merge_and_unload()  # peft reads our adapter format
    expected = hf_logits(reference, IDS)
    assert (hf_logits(hf.__class__.from_pretrained(folder), IDS) - expected).abs().max() > 1e-2  # the adapter matters
    assert (logits_of(loaded, IDS) - expected).abs().max() < 1e-4
    greedy = GenerationConfig(sample=False, max_steps=6, ignore_eos=True)
    prompt = IDS[0, :5].tolist()
    assert_same_greedy_tokens(loaded, prompt, HFEngine(loaded, greedy).generate([prompt])[0].token_ids,
                              LayerSkipEngine(loaded, greedy).generate([prompt])[0].token_ids, row_invariant=False)


def test_adapter_without_a_base_model_is_a_clear_error(tiny_checkpoint, tmp_path):
    folder, hf = tiny_checkpoint()
    adapter = tmp_path / "adapter"
    write_random_adapter(adapter, folder, hf.config)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(LayerSkipError, match="does not name its base model"):
        layerskip.load(str(adapter))


def test_generation_config_supplies_several_eos_ids(tiny_checkpoint):
    folder, _ = tiny_checkpoint()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert layerskip.load(str(folder)).eos_token_ids[:2] == [5, 7]


def round_like_the_gguf(hf) -> None:
    """Give the HF reference the values the GGUF holds: F16 matrices, Q8_0 embeddings."""
    import gguf
    from gguf.quants import dequantize, quantize

    with torch.no_grad():
        for name, parameter in hf.named_parameters():
            if name == "model.embed_tokens.weight":
                array = parameter.numpy()
                q8 = quantize(array, gguf.GGMLQuantizationType.Q8_0)
                parameter.copy_(torch.from_numpy(dequantize(q8, gguf.GGMLQuantizationType.Q8_0).reshape(array.shape)))
            elif parameter.ndim == 2:
                parameter.copy_(parameter.half().float())


def test_gguf_file_loads_like_the_checkpoint_it_came_from(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSKIP_CACHE", str(tmp_path / "cache"))
    _, hf = tiny_checkpoint(num_key_value_heads=2)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf)
    round_like_the_gguf(hf)
    loaded = layerskip.load(str(path))
    assert loaded.tokenizer is None and loaded.eos_token_ids == [3]
    assert (logits_of(loaded, IDS) - hf_logits(hf, IDS)).abs().max() < 1e-4
    # The conversion is cached: a second load reuses the folder rather than converting again.
    folder = resolve_model_folder(str(path))
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_folder(str(path)) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def make_hub_cache(root, repo_id: str, source) -> None:
    """The folder layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_resolves_from_the_local_cache_offline(tiny_checkpoint, tmp_path, monkeypatch):
    folder, hf = tiny_checkpoint()
    make_hub_cache(tmp_path / "hub", "facebook/layerskip-tiny", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = layerskip.load("facebook/layerskip-tiny")
    assert (logits_of(loaded, IDS) - hf_logits(hf, IDS)).abs().max() < 1e-4
    with pytest.raises(LayerSkipError, match="not in the local hub cache.*hf download facebook/absent"):
        layerskip.load("facebook/absent")


def test_pickled_weights_are_refused_not_unpickled(tiny_checkpoint):
    folder, _ = tiny_checkpoint()
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(LayerSkipError, match="never unpickles"):
        layerskip.load(str(folder))


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p / "missing", "unknown model"),
    (lambda p: (p / "notes.txt").write_text("hi") and p / "notes.txt", "not a model checkpoint"),
    (lambda p: (p / "bad.gguf").write_bytes(b"not gguf at all") and p / "bad.gguf", "not a readable GGUF"),
    (lambda p: p, "no config.json"),
])
def test_bad_model_paths_get_clear_errors(tmp_path, make, fragment):
    with pytest.raises(LayerSkipError, match=fragment):
        layerskip.load(str(make(tmp_path)))


def test_bad_dtype_and_device(tiny_checkpoint):
    folder, _ = tiny_checkpoint()
    with pytest.raises(LayerSkipError, match="unknown dtype 'float8'"):
        layerskip.load(str(folder), dtype="float8")
    with pytest.raises(LayerSkipError, match="unknown device 'tpu'"):
        layerskip.load(str(folder), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LayerSkipError, match="CUDA is not available"):
            layerskip.load(str(folder), device="cuda")


def test_bfloat16_loads_and_decodes(tiny_checkpoint):
    folder, hf = tiny_checkpoint()
    loaded = layerskip.load(str(folder), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    # bfloat16 keeps about 3 significant digits: the logits stay close to float32 ones.
    assert (logits_of(loaded, IDS) - hf_logits(hf, IDS)).abs().max() < 0.5


def test_embedded_default_is_converted_once_with_tokenizer_and_chat_template(default_model):
    folder = resolve_model_folder("smollm2-135m")
    assert folder == default_model.folder
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert default_model.tokenizer.has_chat_template
    assert default_model.eos_token_ids == [2]
    ids = default_model.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert default_model.tokenizer.hf.decode(ids).endswith("<|im_start|>assistant\n")


def test_a_shipped_layerskip_adapter_becomes_the_default(tiny_checkpoint, tmp_path, monkeypatch):
    from layerskip.loading import default_model as embedded
    from layerskip.training.lora import save_adapter

    monkeypatch.setattr(embedded, "SHIPPED_ADAPTER", tmp_path / "adapters" / "smollm2-135m-layerskip")
    with pytest.raises(LayerSkipError, match="ships no LayerSkip adapter for smollm2-135m yet"):
        layerskip.load("smollm2-135m-layerskip")
    folder, _ = tiny_checkpoint()
    lora = {"layers.0.self_attn.q_proj.lora_A.weight": torch.full((2, 64), 0.1),
            "layers.0.self_attn.q_proj.lora_B.weight": torch.full((64, 2), 0.2)}
    save_adapter(embedded.SHIPPED_ADAPTER, lora, rank=2, alpha=4, dropout=0.0, targets=["q_proj"], base_model=str(folder))
    (embedded.SHIPPED_ADAPTER / "layerskip.json").write_text(json.dumps({"exit_layer": 2, "num_speculations": 3}))
    loaded = layerskip.load()
    assert (loaded.name, loaded.adapter, loaded.folder) == ("smollm2-135m-layerskip", embedded.SHIPPED_ADAPTER, folder)
    assert loaded.defaults["exit_layer"] == 2
    base = layerskip.load(str(folder)).model.layers[0].self_attn.q_proj.weight
    merged = loaded.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(merged - base, torch.full((64, 64), 2 * 2 * 0.1 * 0.2), atol=1e-6)  # alpha/r * B @ A


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: {"model_type": "llama", "hidden_size": 64},
     "required keys 'vocab_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads' are missing"),
    (lambda c: {**c, "num_attention_heads": "4"}, "key 'num_attention_heads' must be an integer, got \"4\""),
    (lambda c: {**c, "intermediate_size": 0}, "key 'intermediate_size' must be positive, got 0"),
    (lambda c: {**{k: v for k, v in c.items() if k != "head_dim"}, "num_attention_heads": 3},
     "num_attention_heads 3 does not divide hidden_size 64 (and there is no head_dim)"),
    (lambda c: {**c, "num_key_value_heads": 3}, "num_key_value_heads 3 does not divide num_attention_heads 4"),
    (lambda c: {**c, "tie_word_embeddings": "no"}, "key 'tie_word_embeddings' must be true or false"),
    (lambda c: {**{k: v for k, v in c.items() if k != "rope_parameters"}, "rope_scaling": {"rope_type": "linear"}},
     "required key 'rope_scaling.factor' is missing"),
    (lambda c: [c], "is not a JSON object"),
])
def test_bad_config_json_names_the_file_and_the_key(tiny_checkpoint, edit, fragment):
    folder, _ = tiny_checkpoint()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config)))
    with pytest.raises(LayerSkipError) as error:
        layerskip.load(str(folder))
    assert str(error.value).startswith(str(folder / "config.json")) and fragment in str(error.value)


def test_explicit_head_dim_need_not_divide_the_hidden_size(tiny_checkpoint):
    """Llama allows head_dim * heads != hidden_size when head_dim is given; a wrong one names the tensor."""
    folder, hf = tiny_checkpoint(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    assert (logits_of(layerskip.load(str(folder)), IDS) - hf_logits(hf, IDS)).abs().max() < 1e-4
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "head_dim": 8}))
    with pytest.raises(LayerSkipError, match=r"the weights in .* do not match its config.json: tensor "
                                             r"'layers.0.self_attn.q_proj.weight' has shape \[64, 48\], config.json "
                                             r"implies \[32, 48\] \(num_attention_heads 4 x head_dim 8"):
        layerskip.load(str(folder))


def test_missing_tensor_is_named(tiny_checkpoint):
    from safetensors.torch import load_file, save_file

    folder, _ = tiny_checkpoint()
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LayerSkipError, match=r"do not match its config.json: missing \['layers.1.mlp.up_proj.weight'\]"):
        layerskip.load(str(folder))
