"""Self-generated training data: the model's own chat replies to a file of prompts.

Self-speculative decoding is judged on the model's own output, so the best text to train its early exits
on is that output: each document is a prompt in the model's chat template followed by the reply the
model itself sampled (with the reply's end token). Replies are generated in batches by the model being
trained, before training, in its fastest batched format (see load_reply_model: the exact numerics do not
matter for data), and appended to a JSON Lines file as each batch finishes, so an interrupted preparation
resumes.

Batches hold prompts of similar token length (sorted by length), left-padded with positions that no query
attends to; rows that end are dropped from the batch (and from its KV cache) as they end.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from layerskip.errors import LayerSkipError
from layerskip.eval.records import open_records, read_records, write_record
from layerskip.generation.sampling import Sampler
from layerskip.jsonl import read_objects
from layerskip.model import KVCache, Transformer
from layerskip.training.config import DataSource


def read_prompts(path: Path, field: str) -> list[str]:
    prompts = []
    for number, record in read_objects(path):
        prompt = record.get(field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise LayerSkipError(f"{path}:{number} has no non-empty text field '{field}'")
        prompts.append(prompt)
    if not prompts:
        raise LayerSkipError(f"the prompt file {path} is empty")
    return prompts


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (shortest first) and cut into batches of at most batch_size: little padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


CANDIDATES = 64  # sampling looks at each row's most likely tokens only: a full-vocabulary sort costs more than the model


@torch.inference_mode()
def sample_replies(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int, sampler: Sampler,
                   end_ids: frozenset[int]) -> list[list[int]]:
    """One reply per prompt, each ending with its end token if it ended. Every batch row sits at its own positions
    in the cache (per-row start positions), so it decodes as its prompt would alone.

    Sampled replies draw from the warped distribution over each step's 64 most likely tokens (for training
    data the tail beyond them does not matter). Ended rows leave the batch once a quarter of it has ended.
    """
    device = model.inv_freq.device
    lengths = torch.tensor([len(prompt) for prompt in prompts], device=device)
    width = int(lengths.max())
    cache = KVCache(model.config, min(width + max_new_tokens, model.config.max_position_embeddings),
                    batch_size=len(prompts), dtype=model.embed_tokens.weight.dtype, device=device)
    replies: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # the prompt of each batch row, in cache order
    running = set(rows)
    # The prompts' pass is padded at each row's end: a row's padding sits past its own positions, where its next
    # tokens overwrite it before any query of that row can see it.
    inputs = torch.tensor([prompt + [0] * (width - len(prompt)) for prompt in prompts], dtype=torch.long,
                          device=device)
    starts, taken = torch.zeros_like(lengths), lengths  # this pass's first position and real tokens, per row
    while running and int(starts.max()) + inputs.shape[1] <= cache.capacity:
        hidden = model.forward_layers(model.embed(inputs), 0, model.num_layers, starts, cache)
        logits = model.head(hidden[torch.arange(len(rows), device=device), taken - 1])
        starts, taken = starts + taken, torch.ones_like(taken)
        if sampler.sample:
            top = logits.topk(min(CANDIDATES, logits.shape[-1]), dim=-1)
            choice = torch.multinomial(sampler.warp(top.values), 1, generator=sampler.generator)
            tokens = top.indices.gather(1, choice).squeeze(1)
        else:
            tokens = logits.argmax(-1)
        for row, token in zip(rows, tokens.tolist()):
            if row in running:
                replies[row].append(token)
                if token in end_ids or len(replies[row]) == max_new_tokens:
                    running.discard(row)
        if len(rows) - len(running) >= max(1, len(rows) // 4):  # drop ended rows from the batch and its cache
            kept = torch.tensor([slot for slot, row in enumerate(rows) if row in running], dtype=torch.long,
                                device=device)
            cache.keep_rows(kept)
            rows, tokens, starts, taken = [rows[slot] for slot in kept.tolist()], tokens[kept], starts[kept], taken[kept]
        inputs = tokens[:, None]
    return replies


def load_reply_model(model_spec: str | None, device: str = "auto") -> tuple[Any, int]:
    """The model that writes the replies and its batch size, in the fastest batched format measured.

    On CPU: float32 weights through the native int8 kernels, in batches of 8 (2-core Zen 5: 550 tokens/s, where
    bfloat16 in batches of 32 ran at 30 and the int8 kernels slow down past 16 rows); without the native
    kernels, or on a GPU, bfloat16 in batches of 64.
    """
    import layerskip

    try:
        loaded = layerskip.load(model_spec, device=device, quantize="int8")
        if loaded.model.kernel_path == "native":
            return loaded, 8
    except LayerSkipError:  # no native kernels here, or not a CPU
        pass
    return layerskip.load(model_spec, dtype="bfloat16", device=device), 64


def cache_path(source: DataSource, model_spec: str | None, cache_dir: Path) -> Path:
    """Where a source's replies are kept: keyed by the prompts file, the generation settings and the model."""
    prompts = Path(source.self_generated or "")
    stat = prompts.stat()
    payload = [str(prompts.resolve()), stat.st_size, stat.st_mtime_ns, source.field, source.max_new_tokens,
               source.temperature, source.top_p, source.seed, model_spec]
    return cache_dir / f"replies-{hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]}.jsonl"


def self_generated_documents(source: DataSource, model_spec: str | None, cache_dir: Path, *,
                             device: str = "auto", batch_size: int = 0) -> Iterator[list[int]]:
    """Token ids of each prompt (chat template) plus the model's reply, generating the missing replies first
    (`batch_size` prompts at a time; 0: the reply model's own, see load_reply_model)."""
    path = Path(source.self_generated or "").expanduser()
    if not path.is_file():
        raise LayerSkipError(f"data source self_generated: the prompt file '{source.self_generated}' does not exist")
    prompts = read_prompts(path, source.field)
    records_path = cache_path(source, model_spec, cache_dir)
    done = {record["index"]: record["input_ids"] for record in read_records(records_path)}
    if len(done) < len(prompts):
        loaded, fastest_batch = load_reply_model(model_spec, device)
        batch_size = batch_size or fastest_batch
        if loaded.tokenizer is None or not loaded.tokenizer.has_chat_template:
            raise LayerSkipError("data source self_generated needs a model with a tokenizer and a chat template")
        encoded = [loaded.tokenizer.encode_chat([{"role": "user", "content": prompt}]) for prompt in prompts]
        sampler = Sampler(sample=source.temperature > 0, temperature=source.temperature, top_p=source.top_p,
                          seed=source.seed, device=loaded.device)
        batches = [[i for i in batch if i not in done]
                   for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size)]
        sink = open_records(records_path, [{"index": i, "input_ids": ids} for i, ids in done.items()])
        bar = tqdm(total=len(prompts), initial=len(done), desc="generating replies", unit="prompt", file=sys.stderr)
        with sink:
            for batch in filter(None, batches):
                # Each batch draws from its own stream, so a resumed preparation samples what an uninterrupted one would.
                sampler.generator.manual_seed(source.seed * 1_000_003 + batch[0])
                replies = sample_replies(loaded.model, [encoded[i] for i in batch], sampler=sampler,
                                         max_new_tokens=source.max_new_tokens, end_ids=frozenset(loaded.eos_token_ids))
                for index, reply in zip(batch, replies):
                    done[index] = encoded[index] + reply
                    write_record(sink, {"index": index, "input_ids": done[index]})
                bar.update(len(batch))
        bar.close()
        del loaded
    for index in range(len(prompts)):
        yield done[index]
