"""GGUF files (llama.cpp's format): dequantize once into a cached Hugging Face folder.

Quantized tensors are expanded to float32 with the `gguf` package; the tokenizer and chat template
come from the file's metadata through transformers' GGUF tokenizer conversion.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from layerskip.errors import LayerSkipError
from layerskip.loading.cache_dir import cache_root
from layerskip.loading.hf_folder import save_hf_folder
from layerskip.model import ModelConfig

# GGUF tensor name (after "blk.N.") -> our module name (after "layers.N.").
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
GLOBAL_TENSORS = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
# A converted folder is current when its marker holds this version (2: the GGUF blocks are kept beside).
CONVERSION_MARKER = "layerskip_conversion"
CONVERSION_VERSION = 2


def _open(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as error:  # the reader raises bare ValueError/struct errors on foreign files
        raise LayerSkipError(f"{path} is not a readable GGUF file: {error}") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _required(reader: Any, key: str, source: str, kind: type = int) -> Any:
    """A metadata value the config needs, of the given kind, or a LayerSkipError naming the file and the key."""
    value = _field(reader, key)
    if value is None:
        raise LayerSkipError(f"{source}: required GGUF metadata key '{key}' is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        kind_name = "an integer" if kind is int else "a number"
        raise LayerSkipError(f"{source}: GGUF metadata key '{key}' must be {kind_name}, got {str(value)[:40]!r}")
    return kind(value)


def _optional(reader: Any, key: str, source: str, kind: type = int) -> Any:
    """A metadata value of the given kind, or None when the file lacks the key."""
    return None if _field(reader, key) is None else _required(reader, key, source, kind)


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def gguf_config(reader: Any, source: str = "the GGUF file") -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise LayerSkipError(f"unsupported GGUF architecture '{arch}': only 'llama' (Llama, Mistral, SmolLM) is supported")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise LayerSkipError("this GGUF stores Llama 3.1 rope factors as a tensor, which layerskip does not read: "
                             "load the Hugging Face checkpoint instead")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None or len(embed.shape) != 2:
        raise LayerSkipError(f"{source} has no two-dimensional token_embd.weight tensor")
    raw = {
        "vocab_size": _default(_optional(reader, "llama.vocab_size", source), int(embed.shape[1])),
        "hidden_size": _required(reader, "llama.embedding_length", source),
        "intermediate_size": _required(reader, "llama.feed_forward_length", source),
        "num_hidden_layers": _required(reader, "llama.block_count", source),
        "num_attention_heads": _required(reader, "llama.attention.head_count", source),
        "num_key_value_heads": _optional(reader, "llama.attention.head_count_kv", source),
        "head_dim": _optional(reader, "llama.attention.key_length", source),
        "rms_norm_eps": _default(_optional(reader, "llama.attention.layer_norm_rms_epsilon", source, float), 1e-5),
        "rope_theta": _default(_optional(reader, "llama.rope.freq_base", source, float), 10000.0),
        "max_position_embeddings": _default(_optional(reader, "llama.context_length", source), 2048),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }
    if _field(reader, "llama.rope.scaling.type") == "linear":
        raw["rope_scaling"] = {"rope_type": "linear",
                               "factor": _required(reader, "llama.rope.scaling.factor", source, float)}
    return ModelConfig.from_hf_dict(raw, source=f"{source} (its metadata as a config)")


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's row order for q/k projections (pairs interleaved) back to HF's rotate-half order."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


Blocks = dict[str, tuple[str, torch.Tensor]]
BLOCK_TYPES = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}  # the GGUF block formats our kernels run


def gguf_state_dict(reader: Any, config: ModelConfig) -> tuple[dict[str, torch.Tensor], Blocks]:
    """Float32 weights (dequantized by the gguf package) with our names, and the raw blocks of the tensors
    stored in a block format our kernels run (a tied head's blocks are those of the token embedding)."""
    from gguf.quants import dequantize

    state, blocks = {}, {}
    for tensor in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", leave=False):
        stem, _, suffix = tensor.name.rpartition(".")
        if stem.startswith("blk."):
            _, index, kind = (stem.split(".", 2) + ["", ""])[:3]
            if kind not in LAYER_TENSORS or not index.isdigit():
                raise LayerSkipError(f"unsupported GGUF tensor '{tensor.name}'")
            if int(index) >= config.num_hidden_layers:
                raise LayerSkipError(f"GGUF tensor '{tensor.name}' lies past the {config.num_hidden_layers} layers "
                                     "of the file's llama.block_count")
            name = f"layers.{index}.{LAYER_TENSORS[kind]}.{suffix}"
        elif stem in GLOBAL_TENSORS:
            name = f"{GLOBAL_TENSORS[stem]}.{suffix}"
        else:
            raise LayerSkipError(f"unsupported GGUF tensor '{tensor.name}'")
        shape = [int(d) for d in reversed(tensor.shape)]
        try:
            values = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # a writable copy
            values = values.reshape(shape)
        except (ValueError, NotImplementedError) as error:
            raise LayerSkipError(f"GGUF tensor '{tensor.name}' ({tensor.tensor_type.name}, shape {shape}) "
                                 f"cannot be read: {error}") from None
        raw = np.array(tensor.data) if tensor.tensor_type.name in BLOCK_TYPES else None  # [rows, bytes]
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(stem.split(".")[-1])
        if heads and (values.ndim != 2 or values.shape[0] != heads * config.head_dim):
            raise LayerSkipError(f"GGUF tensor '{tensor.name}' has shape {list(values.shape)}, the metadata implies "
                                 f"[{heads * config.head_dim}, {config.hidden_size}] ({heads} heads x head_dim "
                                 f"{config.head_dim})")
        if heads:  # whole rows move, so the blocks follow the same permutation
            values = unpermute_rotary_rows(values, heads)
            raw = None if raw is None else unpermute_rotary_rows(raw, heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(values))
        if raw is not None:
            block_name = "lm_head.weight" if name == "embed_tokens.weight" and config.tie_word_embeddings else name
            blocks[block_name] = (BLOCK_TYPES[tensor.tensor_type.name], torch.from_numpy(np.ascontiguousarray(raw)))
    return state, blocks


def gguf_eos_ids(reader: Any) -> list[int]:
    ids = [_field(reader, key) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def gguf_tokenizer(path: Path, reader: Any) -> Any:
    if "tokenizer.ggml.model" not in reader.fields:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as error:  # transformers' GGUF conversion raises many types on bad metadata
        detail = " ".join(str(error).split())[:200] or type(error).__name__
        raise LayerSkipError(f"cannot read the tokenizer stored in {path}: {detail}") from None


def converted_folder_for(path: Path) -> Path:
    """Where a GGUF file's conversion is cached: keyed by its absolute path, size and mtime."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def convert_gguf(path: Path, folder: Path | None = None) -> Path:
    """Convert a GGUF file into an HF folder (once; later calls return the cached folder)."""
    folder = folder or converted_folder_for(path)
    marker = folder / CONVERSION_MARKER
    if marker.is_file() and marker.read_text().strip() == str(CONVERSION_VERSION):
        return folder
    reader = _open(path)
    config = gguf_config(reader, str(path))
    print(f"layerskip: converting {path.name} once into {folder} (later loads take under a second)", file=sys.stderr)
    state, blocks = gguf_state_dict(reader, config)
    save_hf_folder(folder, config, state, eos_ids=gguf_eos_ids(reader), tokenizer=gguf_tokenizer(path, reader),
                   blocks=blocks)
    marker.write_text(f"{CONVERSION_VERSION}\n")
    return folder
