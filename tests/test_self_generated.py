"""Self-generated training data: batched, left-padded replies equal the model's one-at-a-time decoding; resumable."""

from __future__ import annotations

import json

import pytest
import torch

import layerskip
from layerskip.errors import LayerSkipError
from layerskip.eval.records import read_records
from layerskip.generation import Sampler
from layerskip.training.config import DataSource
from conftest import assert_same_greedy_tokens
from layerskip.training.self_generated import cache_path, generate_replies, load_reply_model, self_generated_documents


def test_batched_replies_equal_single_prompt_decoding(tiny_checkpoint):
    folder, _ = tiny_checkpoint(max_position_embeddings=64)
    loaded = layerskip.load(str(folder))
    prompts = dict(enumerate([[3, 14, 15], [92, 65, 35, 89, 79, 32, 38], [46], [26, 43, 38, 32, 79], [7, 7]]))

    def replies(sampler_for, end_ids):
        return dict(generate_replies(loaded.model, prompts, slots=2, max_new_tokens=12, sampler_for=sampler_for,
                                     end_ids=end_ids))

    unended = replies(lambda index: Sampler(sample=False), ())
    end_id = unended[1][3]  # as the end token, the second prompt ends after 4 tokens and frees its slot early
    batch = replies(lambda index: Sampler(sample=False), [end_id])
    assert sorted(batch) == sorted(prompts)
    for index, prompt in prompts.items():
        alone = layerskip.generate(loaded, prompt_ids=prompt, sample=False, max_steps=12, stop_token_ids=[end_id],
                                   generation_strategy="autoregressive")
        assert_same_greedy_tokens(loaded, prompt, alone.token_ids, batch[index])
    assert len(batch[1]) <= 4 and batch[1][-1] == end_id
    # Sampling: each prompt draws from its own seed, so the same replies whatever the batch around it.
    sampled = [replies(lambda index: Sampler(sample=True, temperature=0.8, seed=index), [end_id]) for _ in range(2)]
    assert sampled[0] == sampled[1]
    alone = layerskip.generate(loaded, prompt_ids=prompts[3], sample=True, temperature=0.8, top_p=1.0, seed=3,
                               max_steps=12, stop_token_ids=[end_id], generation_strategy="autoregressive")
    if loaded.model.row_invariant:  # the same logits as alone, so the same draws
        assert alone.token_ids == sampled[0][3]


def test_self_generated_source_is_chat_prompt_plus_reply_and_resumes(tmp_path):
    """Like with like: the reference decodes with the reply model (its format and kernels), and one prompt per
    batch keeps the same row shapes as one-at-a-time decoding (batching is tested above)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Say hi.", "Name a colour.", "Count to 3."]))
    source = DataSource(self_generated=str(prompts), field="prompt", max_new_tokens=6, temperature=0.0)
    documents = list(self_generated_documents(source, "smollm2-135m", tmp_path / "cache", batch_size=1))
    base, _ = load_reply_model("smollm2-135m")
    for prompt, document in zip(["Say hi.", "Name a colour.", "Count to 3."], documents):
        chat = base.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        reply = layerskip.generate(base, prompt_ids=chat, sample=False, max_steps=6,
                                   generation_strategy="autoregressive").token_ids
        assert document == chat + reply
    # An interrupted preparation keeps what it wrote: cut the file after one record, and only two are generated.
    records = cache_path(source, "smollm2-135m", tmp_path / "cache")
    kept = read_records(records)[:1]
    records.write_text(json.dumps(kept[0]) + "\n" + '{"index": 1, "input_')
    assert list(self_generated_documents(source, "smollm2-135m", tmp_path / "cache", batch_size=1)) == documents
    assert sorted(r["index"] for r in read_records(records)) == [0, 1, 2]
    with pytest.raises(LayerSkipError, match="has no non-empty text field 'text'"):
        list(self_generated_documents(DataSource(self_generated=str(prompts)), "smollm2-135m", tmp_path / "c2"))
