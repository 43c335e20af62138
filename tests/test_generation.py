"""Greedy self-speculative decoding is token-identical to autoregressive decoding; caches roll back exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import layerskip
from layerskip.errors import LayerSkipError
from layerskip.generation import (Autoregressive, BatchEngine, GenerationConfig, Sampler, SelfSpeculative, Streamer,
                                  generate_ids)
from layerskip.generation.strategies import DecodeContext
from layerskip.model import KVCache
from conftest import assert_same_greedy_tokens

GREEDY = dict(sample=False)


class RoundRecorder(Streamer):
    """Counts rounds whose tokens were cut short by a stop condition (a stop reached mid-round)."""

    def __init__(self) -> None:
        self.cut_rounds = 0

    def on_tokens(self, committed, step) -> None:
        self.cut_rounds += len(committed) < len(step.tokens)


# ---------------------------------------------------------------- tiny random model: many configurations


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_hf_model

    folder = tmp_path_factory.mktemp("tiny")
    make_hf_model(num_hidden_layers=5).save_pretrained(folder)
    return layerskip.load(str(folder))


TINY_PROMPTS = [[3, 14, 15, 92, 65], [2, 71, 82, 81, 82, 84, 59, 4, 52], [9], [60, 61, 62, 63, 64, 65, 66, 67]]


@pytest.mark.parametrize("exit_layer", [1, 2, 4])
@pytest.mark.parametrize("num_speculations", [1, 3, 8])
def test_tiny_self_speculative_greedy_equals_autoregressive(tiny, exit_layer, num_speculations):
    for prompt in TINY_PROMPTS:
        reference = layerskip.generate(tiny, prompt_ids=prompt, max_steps=30, **GREEDY)
        result = layerskip.generate(tiny, prompt_ids=prompt, max_steps=30, generation_strategy="self_speculative",
                                    exit_layer=exit_layer, num_speculations=num_speculations, **GREEDY)
        assert_same_greedy_tokens(tiny, prompt, reference.token_ids, result.token_ids)
        if result.token_ids != reference.token_ids:
            continue  # parted at a near-tie of a library kernel: the statistics below assume 30 tokens
        stats = result.stats
        assert stats.new_tokens == 30 and stats.verify_forwards == stats.rounds
        # Every round drafts except, possibly, a last one with a single token of budget left.
        assert stats.rounds - 1 <= sum(stats.accepted_length_counts) <= stats.rounds
        assert sum(i * n for i, n in enumerate(stats.accepted_length_counts)) == stats.accepted_drafts


@pytest.mark.parametrize("exit_layer, num_speculations", [(1, 1), (2, 3), (4, 2)])
@pytest.mark.parametrize("candidates", [2, 5])
def test_tree_drafts_keep_greedy_output_and_accept_alternatives(tiny, exit_layer, num_speculations, candidates):
    alternatives_taken = 0
    for prompt in TINY_PROMPTS:
        reference = layerskip.generate(tiny, prompt_ids=prompt, max_steps=30, **GREEDY)
        chain = layerskip.generate(tiny, prompt_ids=prompt, max_steps=30, generation_strategy="self_speculative",
                                   exit_layer=exit_layer, num_speculations=num_speculations, **GREEDY)
        tree = layerskip.generate(tiny, prompt_ids=prompt, max_steps=30, generation_strategy="self_speculative",
                                  exit_layer=exit_layer, num_speculations=num_speculations,
                                  draft_candidates=candidates, **GREEDY)
        assert_same_greedy_tokens(tiny, prompt, reference.token_ids, tree.token_ids)
        assert tree.settings["draft_candidates"] == candidates
        alternatives_taken += tree.stats.accepted_drafts - chain.stats.accepted_drafts
    assert alternatives_taken > 0  # the alternatives were accepted where the chain's draft was not


def test_greedy_comparison_accepts_only_a_near_tie(tiny):
    """The comparison the equality tests use: a planted wrong token is caught, on every kernel path."""
    prompt = TINY_PROMPTS[0]
    reference = layerskip.generate(tiny, prompt_ids=prompt, max_steps=8, **GREEDY).token_ids
    planted = reference[:3] + [(reference[3] + 1) % 97] + reference[4:]
    for row_invariant in (False, True):
        assert_same_greedy_tokens(tiny, prompt, reference, list(reference), row_invariant=row_invariant)
        with pytest.raises(AssertionError, match="tokens part at 3"):
            assert_same_greedy_tokens(tiny, prompt, reference, planted, row_invariant=row_invariant)
    with pytest.raises(AssertionError, match="stops early"):
        assert_same_greedy_tokens(tiny, prompt, reference, reference[:5], row_invariant=False)


@pytest.mark.parametrize("vocab_size, confidence", [(40, 0.0), (97, 0.5), (30, 0.2)])
def test_tiny_drafts_from_a_head_slice_or_stopping_early_keep_greedy_output(tiny, vocab_size, confidence):
    ranked = list(range(96, -1, -1))  # any ranking: the slice holds the last ids of the vocabulary
    tiny.model.set_draft_vocab(ranked)
    defaults = {**tiny.defaults, "draft_vocab": ranked}
    tiny = dataclasses.replace(tiny, defaults=defaults)
    drafted = []
    for prompt in TINY_PROMPTS:
        reference = layerskip.generate(tiny, prompt_ids=prompt, max_steps=30, generation_strategy="autoregressive",
                                       **GREEDY)
        result = layerskip.generate(tiny, prompt_ids=prompt, max_steps=30, generation_strategy="self_speculative",
                                    exit_layer=2, num_speculations=5, draft_vocab_size=vocab_size,
                                    draft_confidence=confidence, **GREEDY)
        assert_same_greedy_tokens(tiny, prompt, reference.token_ids, result.token_ids)
        assert result.settings["draft_vocab_size"] == vocab_size
        drafted.append(result.stats.drafted_tokens / result.stats.rounds)
    if confidence:  # unsure drafts end a round early: fewer than k drafts per round on average
        assert sum(drafted) / len(drafted) < 4.5
    with torch.inference_mode():  # the slice scores exactly its tokens, with the full head's values
        hidden = tiny.model.forward_layers(tiny.model.embed(torch.tensor([TINY_PROMPTS[0]])), 0, 2)
        full, sliced = tiny.model.head(hidden), tiny.model.draft_head(hidden, vocab_size)
        kept = torch.tensor(ranked[:vocab_size])
        assert torch.allclose(sliced[..., kept], full[..., kept], atol=1e-5)
        assert sliced.isinf().sum() == full[..., 0].numel() * (97 - vocab_size)


def test_stored_defaults_choose_the_strategy_and_draft_settings():
    stored = {"generation_strategy": "self_speculative", "exit_layer": 6, "num_speculations": 3,
              "draft_vocab_size": 100, "draft_confidence": 0.4, "draft_vocab": list(range(200))}
    config = GenerationConfig().resolved(30, stored)
    assert (config.generation_strategy, config.exit_layer, config.num_speculations) == ("self_speculative", 6, 3)
    assert (config.draft_vocab_size, config.draft_confidence) == (100, 0.4)
    plain = GenerationConfig(generation_strategy="autoregressive").resolved(30, stored)
    assert (plain.exit_layer, plain.draft_vocab_size, plain.strategy().name) == (-1, 0, "autoregressive")
    assert GenerationConfig().resolved(30, {}).generation_strategy == "autoregressive"
    with pytest.raises(LayerSkipError, match="--draft_vocab_size 300 is outside \\[0, 200\\]"):
        GenerationConfig(draft_vocab_size=300).resolved(30, stored)
    with pytest.raises(LayerSkipError, match="this model stores no draft vocabulary"):
        GenerationConfig(generation_strategy="self_speculative", draft_vocab_size=8).resolved(30, {})
    with pytest.raises(LayerSkipError, match="--draft_confidence must be in"):
        GenerationConfig(draft_confidence=1.5).resolved(30, stored)


def test_stop_token_reached_mid_round(tiny):
    prompt = TINY_PROMPTS[1]
    reference = layerskip.generate(tiny, prompt_ids=prompt, max_steps=30, **GREEDY).token_ids
    stop = reference[7]
    recorder = RoundRecorder()
    result = layerskip.generate(tiny, prompt_ids=prompt, max_steps=30, generation_strategy="self_speculative",
                                exit_layer=4, num_speculations=8, stop_token_ids=[stop], streamer=recorder, **GREEDY)
    assert_same_greedy_tokens(tiny, prompt, reference[:reference.index(stop) + 1], result.token_ids)
    assert result.finish_reason == "stop_token"


def test_early_exit_equals_argmax_of_exit_logits(tiny):
    prompt = list(TINY_PROMPTS[0])
    result = layerskip.generate(tiny, prompt_ids=prompt, max_steps=12, exit_layer=2, **GREEDY)
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(12):
            tokens.append(int(tiny.model(torch.tensor([tokens]), exit_layer=2)[0, -1].argmax()))
    assert_same_greedy_tokens(tiny, prompt, tokens[len(prompt):], result.token_ids, exit_layer=2)


class RoundLog(Streamer):
    def __init__(self) -> None:
        self.rounds: list = []

    def on_tokens(self, committed, step) -> None:
        self.rounds.append(step)


def assert_caches_hold_only_committed_tokens(model, cache: KVCache, exits, tokens: list[int], exit_layer: int) -> None:
    """Positions [0, len - 1) are final (the newest token is not yet in any cache): their keys, values and exit
    states equal those of the committed tokens run alone."""
    final = len(tokens) - 1
    reference = KVCache(model.config, 64)
    ids = torch.tensor([tokens[:final]])
    model(ids, cache=reference)
    assert torch.allclose(cache.keys[:, :, :, :final], reference.keys[:, :, :, :final], atol=1e-5)
    assert torch.allclose(cache.values[:, :, :, :final], reference.values[:, :, :, :final], atol=1e-5)
    assert torch.allclose(exits.read(0, final), model.forward_layers(model.embed(ids), 0, exit_layer), atol=1e-5)


@pytest.mark.parametrize("prompt, exit_layer, speculations, candidates",
                         [(TINY_PROMPTS[1], 1, 4, 1), (TINY_PROMPTS[2], 3, 1, 4)], ids=["chain", "tree"])
def test_caches_after_every_round_hold_only_the_accepted_tokens(tiny, monkeypatch, prompt, exit_layer, speculations,
                                                                 candidates):
    """Rejected drafts leave nothing behind; an accepted tree alternative's keys, values and exit state move to its
    position's slot, and its siblings' mask is lifted."""
    model = tiny.model
    buffers = []
    original = DecodeContext.exit_buffer
    monkeypatch.setattr(DecodeContext, "exit_buffer", lambda self, capacity=None: buffers.append(
        original(self, capacity)) or buffers[-1])
    engine, log = BatchEngine(model, slots=1, capacity=64), RoundLog()
    rejected = taken = 0
    with torch.inference_mode():
        sequence = engine.add(prompt, SelfSpeculative(exit_layer, speculations, draft_candidates=candidates),
                              Sampler(sample=False), max_new_tokens=60, streamer=log)
        for _ in range(12):
            engine.step()
            step = log.rounds[-1]
            rejected += step.accepted_drafts < len(step.drafted)
            taken += bool(step.drafted) and step.accepted_drafts == len(step.drafted) and \
                step.tokens[len(step.drafted) - 1] != step.drafted[-1]
            assert_caches_hold_only_committed_tokens(model, engine.cache, buffers[0], sequence.ctx.tokens, exit_layer)
            assert engine.cache.attendable is None or bool(engine.cache.attendable.all())
    assert rejected >= 3 and (taken >= 2 or candidates == 1)


def test_max_steps_and_context_length_bound_every_strategy(tiny_checkpoint):
    folder, _ = tiny_checkpoint(max_position_embeddings=24)
    loaded = layerskip.load(str(folder))
    prompt = list(range(10, 20))
    for options in ({}, dict(generation_strategy="self_speculative", exit_layer=2, num_speculations=5)):
        capped = layerskip.generate(loaded, prompt_ids=prompt, max_steps=7, **options, **GREEDY)
        assert len(capped.token_ids) == 7 and capped.finish_reason == "max_steps"
        full = layerskip.generate(loaded, prompt_ids=prompt, max_steps=100, **options, **GREEDY)
        assert len(full.token_ids) == 24 - len(prompt) and full.finish_reason == "context_length"


# ---------------------------------------------------------------- the embedded default: real text

CODE = [
    "def quicksort(items):\n",
    "import os\n\ndef list_python_files(folder):\n    \"\"\"Return the .py files under folder.\"\"\"\n",
    "class Stack:\n    def __init__(self):\n",
    "# Compute the n-th Fibonacci number iteratively\ndef fib(n):\n",
    "SELECT name, COUNT(*) FROM orders",
    "function debounce(fn, wait) {\n",
    "for i in range(10):\n    if i % 3 == 0:\n",
    "#include <stdio.h>\n\nint main(void) {\n",
]
PROSE = [
    "The history of the printing press begins",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village by the sea,",
    "The three most important things to know about volcanoes are",
    "In economics, inflation refers to",
    "The first rule of writing clear documentation is",
    "Mount Everest is",
    "A good night's sleep matters because",
]
CHAT = [
    "What is the capital of France? Answer in one word.",
    "Say hello.",
    "Give me a synonym for 'happy'. One word only.",
    "Write a haiku about autumn.",
    "What is 2 + 2? Reply with the number only.",
    "Translate 'thank you' into Spanish. One word.",
    "Name a primary colour.",
    "Is the sun a star? Answer yes or no.",
]


@dataclasses.dataclass(frozen=True)
class Case:
    prompt: str
    chat: bool
    stop_words: tuple[str, ...] = ()
    max_steps: int = 20


CASES = ([Case(p, False, max_steps=16) for p in CODE[:6]] + [Case(p, False, ("\n",)) for p in CODE[6:]]
         + [Case(p, False, max_steps=16) for p in PROSE[:5]] + [Case(p, False, (". ", ", ")) for p in PROSE[5:]]
         + [Case(p, True, max_steps=40) for p in CHAT])
CONFIGS = [(1, 3), (8, 2), (15, 1), (22, 4), (29, 6)]  # (exit_layer, num_speculations); L = 30


def cases_for(config_index: int) -> list[Case]:
    """Each case runs under two configurations (to bound CI time): case i under configs i and i + 2 (mod 5)."""
    return [case for i, case in enumerate(CASES) if config_index in (i % len(CONFIGS), (i + 2) % len(CONFIGS))]


def case_prompt_ids(loaded, case: Case) -> list[int]:
    return layerskip.encode_prompt(loaded, case.prompt, chat=case.chat)


def assert_same_case_output(loaded, case: Case, reference, result) -> None:
    """Token-identical greedy output (see assert_same_greedy_tokens), and then the same text and finish reason."""
    assert_same_greedy_tokens(loaded, case_prompt_ids(loaded, case), reference.token_ids, result.token_ids)
    if result.token_ids == reference.token_ids:
        assert result.text == reference.text and result.finish_reason == reference.finish_reason


def run_case(loaded, case: Case, streamer=None, **options):
    options = {"generation_strategy": "autoregressive", **options}  # None: the model's stored default
    return layerskip.generate(loaded, case.prompt, chat=case.chat, stop_words=list(case.stop_words),
                              max_steps=case.max_steps, streamer=streamer, **GREEDY, **options)


@pytest.fixture(scope="module")
def references(default_model):
    return {case: run_case(default_model, case) for case in CASES}


def test_the_default_cases_reach_eos_and_stop_words(references):
    reasons = [result.finish_reason for result in references.values()]
    assert len(CASES) >= 20
    assert reasons.count("eos") >= 3 and reasons.count("stop_word") >= 2


@pytest.mark.parametrize("config_index", range(len(CONFIGS)), ids=[f"E{e}-k{k}" for e, k in CONFIGS])
def test_default_self_speculative_greedy_is_token_identical(default_model, references, config_index):
    exit_layer, num_speculations = CONFIGS[config_index]
    recorder = RoundRecorder()
    for case in cases_for(config_index):
        reference = references[case]
        result = run_case(default_model, case, streamer=recorder, generation_strategy="self_speculative",
                          exit_layer=exit_layer, num_speculations=num_speculations)
        assert_same_case_output(default_model, case, reference, result)
    if exit_layer == 29:  # drafts this deep are accepted often enough to run past EOS or a stop word
        assert recorder.cut_rounds > 0


def test_stored_settings_with_a_draft_slice_and_confidence_keep_greedy_output(default_model, references):
    """What a plain `generate` runs on a LayerSkip model that stores self-speculative settings (strategy, exit,
    drafts per round, a slice of frequent tokens for drafts, a confidence stop)."""
    ranked = list(range(8192))  # any ranking serves exactness: the slice only changes what drafts can propose
    stored = {"generation_strategy": "self_speculative", "exit_layer": 24, "num_speculations": 4,
              "draft_vocab_size": 8192, "draft_confidence": 0.3, "draft_vocab": ranked}
    shipped = default_model.model.draft_vocab
    default_model.model.set_draft_vocab(ranked)
    loaded = dataclasses.replace(default_model, defaults=stored)
    drafted = rounds = 0
    try:
        for case in cases_for(0) + cases_for(3):
            result = run_case(loaded, case, generation_strategy=None)
            assert_same_case_output(loaded, case, references[case], result)
            assert result.settings == {key: stored[key] for key in ("generation_strategy", "exit_layer",
                                                                    "num_speculations", "draft_vocab_size",
                                                                    "draft_confidence")}
            drafted, rounds = drafted + result.stats.drafted_tokens, rounds + result.stats.rounds
    finally:  # the session's default model keeps its own ranking for the tests after this one
        default_model.model.set_draft_vocab(None if shipped is None else shipped.tolist())
    assert 0 < drafted < 4 * rounds  # the confidence stop ended some rounds before k drafts


def test_stop_word_spanning_two_tokens_cuts_text_before_it(default_model):
    case = Case("The history of the printing press begins", False, max_steps=30)
    full = run_case(default_model, case)
    pieces = default_model.tokenizer.token_texts(full.token_ids)
    index = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop_word = pieces[index][-2:] + pieces[index + 1][:2]
    expected_text = full.text[:full.text.index(stop_word)]
    for options in ({}, dict(generation_strategy="self_speculative", exit_layer=26, num_speculations=6)):
        result = run_case(default_model, dataclasses.replace(case, stop_words=(stop_word,)), **options)
        assert result.finish_reason == "stop_word"
        assert result.text == expected_text
        assert_same_greedy_tokens(default_model, case_prompt_ids(default_model, case),
                                  full.token_ids[:len(result.token_ids)], result.token_ids)
        assert stop_word in default_model.tokenizer.decode(result.token_ids)
        assert stop_word not in default_model.tokenizer.decode(result.token_ids[:-1])


def test_the_shipped_draft_adapter_drafts_and_keeps_greedy_output(default_model, references):
    """Plain `generate` on the embedded default: its stored settings draft through the packaged adapter, and the
    output is the model's own."""
    assert default_model.draft_adapter is not None and default_model.draft_adapter_path.name == "smollm2-135m-draft"
    accepted = drafted = 0
    for case in cases_for(0) + cases_for(2):
        result = run_case(default_model, case, generation_strategy=None)
        assert result.settings["draft_adapter"] == "smollm2-135m-draft"
        assert_same_case_output(default_model, case, references[case], result)
        accepted, drafted = accepted + result.stats.accepted_drafts, drafted + result.stats.drafted_tokens
    assert accepted > 0.3 * drafted  # drafts through it are accepted far more often than the plain exit's


# ---------------------------------------------------------------- batches: every row as it would decode alone

def decode_in_batch(loaded, prompts: list[list[int]], strategies_and_samplers, *, slots: int,
                    max_new_tokens: list[int]) -> list[list[int]]:
    """Each prompt's new tokens through one engine of `slots` slots; prompts beyond the first `slots` join as slots
    free up, between steps, while the others are mid-way."""
    engine = BatchEngine(loaded.model, slots=slots, capacity=max(map(len, prompts)) + max(max_new_tokens))

    def add(index: int):
        return engine.add(prompts[index], *strategies_and_samplers(index), max_new_tokens=max_new_tokens[index],
                          eos_token_ids=loaded.eos_token_ids)

    with torch.inference_mode():
        finished = dict(engine.each(range(len(prompts)), add))
    return [finished[index].new_tokens for index in range(len(prompts))]


BATCH_PROMPTS = [[3, 14, 15, 92, 65], [2, 71, 82], [9], [60, 61, 62, 63, 64, 65, 66, 67], [5, 5, 5, 5], [33, 44]]


@pytest.mark.parametrize("strategy", [Autoregressive(), Autoregressive(exit_layer=2), SelfSpeculative(2, 3),
                                      SelfSpeculative(1, 2, draft_candidates=3)], ids=lambda s: str(s.describe()))
def test_batch_rows_decode_exactly_as_alone(tiny, strategy):
    """Prompts of different lengths, rows that finish at different times (their own max_new_tokens), and rows that
    join mid-way into freed slots: every row's greedy tokens equal the prompt decoded alone; bit-exact where the
    kernels are row-invariant."""
    limits = [20, 7, 25, 12, 3, 18]
    alone = [generate_ids(tiny.model, prompt, strategy, Sampler(sample=False), max_new_tokens=limit,
                          eos_token_ids=tiny.eos_token_ids).token_ids for prompt, limit in zip(BATCH_PROMPTS, limits)]
    batch = decode_in_batch(tiny, BATCH_PROMPTS, lambda index: (strategy, Sampler(sample=False)), slots=4,
                            max_new_tokens=limits)
    for prompt, expected, actual in zip(BATCH_PROMPTS, alone, batch):
        assert_same_greedy_tokens(tiny, prompt, expected, actual, exit_layer=strategy.describe().get("exit_layer")
                                  if strategy.name == "autoregressive" else None)


def test_batch_rows_sample_from_their_own_generator(tiny):
    """A row's samples for a seed do not depend on the other rows: the same as alone, with any companions."""
    strategy = SelfSpeculative(2, 2)
    settings = dict(sample=True, temperature=0.9, top_p=0.95)
    alone = [generate_ids(tiny.model, prompt, strategy, Sampler(**settings, seed=index), max_new_tokens=15,
                          eos_token_ids=tiny.eos_token_ids).token_ids for index, prompt in enumerate(BATCH_PROMPTS)]
    batch = decode_in_batch(tiny, BATCH_PROMPTS, lambda index: (strategy, Sampler(**settings, seed=index)), slots=3,
                            max_new_tokens=[15] * len(BATCH_PROMPTS))
    if tiny.model.row_invariant:
        assert batch == alone
    else:  # library kernels move logits by ~1e-6 with the rows beside them: a draw can only rarely change
        assert sum(a == b for a, b in zip(alone, batch)) >= len(alone) - 1


def test_the_default_models_stored_settings_decode_a_batch_as_alone(default_model):
    """The embedded default through its adapter and tree drafts, four chat prompts in two slots."""
    tokenizer = default_model.tokenizer
    prompts = [tokenizer.encode_chat([{"role": "user", "content": text}]) for text in
               ("Name three colours.", "Write a Python function that adds two numbers.", "What is 7 times 8?",
                "Say hello in French.")]
    config = GenerationConfig(sample=False, max_steps=24).resolved(default_model.config.num_hidden_layers,
                                                                   default_model.defaults)
    strategy = layerskip.strategy_for(default_model, config)
    assert strategy.describe().get("draft_candidates", 1) > 1 and "draft_adapter" in strategy.describe()
    alone = [generate_ids(default_model.model, prompt, strategy, Sampler(sample=False), max_new_tokens=24,
                          eos_token_ids=default_model.eos_token_ids).token_ids for prompt in prompts]
    batch = decode_in_batch(default_model, prompts, lambda index: (strategy, Sampler(sample=False)), slots=2,
                            max_new_tokens=[24] * len(prompts))
    for prompt, expected, actual in zip(prompts, alone, batch):
        assert_same_greedy_tokens(default_model, prompt, expected, actual)


def test_generate_takes_a_list_of_prompts_and_returns_what_each_gives_alone(default_model):
    """Exactly, through row-invariant kernels; through library kernels greedy may part only at a near-tie."""
    prompts = ["Name a fruit.", [{"role": "user", "content": "Count to five."}], "What is the capital of Italy?"]
    exact = default_model.model.row_invariant
    for options in (dict(sample=False), dict(sample=True, seed=5)) if exact else (dict(sample=False),):
        batch = layerskip.generate(default_model, prompts, max_steps=16, batch_size=2, **options)
        for prompt, result in zip(prompts, batch):
            alone = layerskip.generate(default_model, prompt, max_steps=16, **options)
            if exact:
                assert result.token_ids == alone.token_ids and result.text == alone.text
            else:
                ids = layerskip.encode_prompt(default_model, prompt)
                assert_same_greedy_tokens(default_model, ids, alone.token_ids, result.token_ids)
            assert result.settings == alone.settings and result.stats.new_tokens == len(result.token_ids)
    with pytest.raises(LayerSkipError, match="batch_size must be at least 1"):
        layerskip.generate(default_model, prompts, batch_size=0)


def test_a_cancelled_sequence_frees_its_slot_and_leaves_nothing_behind(tiny):
    """Cancel a sequence mid-way (trees leave masks), and the next one in its slot decodes as in a fresh engine."""
    strategy = SelfSpeculative(2, 2, draft_candidates=3)
    engine = BatchEngine(tiny.model, slots=2, capacity=48)
    with torch.inference_mode():
        keep = engine.add(BATCH_PROMPTS[0], strategy, Sampler(sample=False), max_new_tokens=30)
        cancelled = engine.add(BATCH_PROMPTS[3], strategy, Sampler(sample=False), max_new_tokens=30)
        for _ in range(4):
            engine.step()
        engine.remove(cancelled)
        assert engine.free == [cancelled.slot] and engine.running == [keep]
        late = engine.add(BATCH_PROMPTS[1], strategy, Sampler(sample=False), max_new_tokens=20)
        assert late.slot == cancelled.slot
        while engine.running:
            engine.step()
    fresh = generate_ids(tiny.model, BATCH_PROMPTS[1], strategy, Sampler(sample=False), max_new_tokens=20)
    assert_same_greedy_tokens(tiny, BATCH_PROMPTS[1], fresh.token_ids, late.new_tokens)
    assert_same_greedy_tokens(tiny, BATCH_PROMPTS[0], generate_ids(tiny.model, BATCH_PROMPTS[0], strategy,
                              Sampler(sample=False), max_new_tokens=30).token_ids, keep.new_tokens)


def test_a_batch_over_max_speculative_batch_decodes_greedy_rows_without_drafts(tiny):
    """Greedy rows draft only while at most max_speculative_batch sequences run, with the same output; a sampled
    row keeps drafting (its seeded samples must not depend on the batch), its rounds exactly as alone."""
    strategy = SelfSpeculative(2, 3)
    limits, samplers = [20, 4, 4, 20], [lambda: Sampler(sample=False)] * 3 + [
        lambda: Sampler(sample=True, temperature=0.9, seed=3)]
    engine = BatchEngine(tiny.model, slots=4, capacity=48, max_speculative_batch=2)
    with torch.inference_mode():
        alone = [generate_ids(tiny.model, prompt, strategy, make(), max_new_tokens=limit)
                 for prompt, make, limit in zip(BATCH_PROMPTS, samplers, limits)]
        batch = dict(engine.each(range(4), lambda i: engine.add(BATCH_PROMPTS[i], strategy, samplers[i](),
                                                                max_new_tokens=limits[i])))
    for index in range(3):
        assert_same_greedy_tokens(tiny, BATCH_PROMPTS[index], alone[index].token_ids, batch[index].new_tokens)
    assert batch[1].stats.drafted_tokens == batch[2].stats.drafted_tokens == 0  # 4 ran: no drafts
    assert 0 < batch[0].stats.drafted_tokens < alone[0].stats.drafted_tokens  # drafts once 2 were left
    if tiny.model.row_invariant:
        sampled = batch[3]
        assert sampled.new_tokens == alone[3].token_ids
        assert (sampled.stats.rounds, sampled.stats.drafted_tokens) == (alone[3].stats.rounds,
                                                                       alone[3].stats.drafted_tokens)


def test_rows_of_very_different_lengths_run_in_separate_passes(tiny, monkeypatch):
    """A prompt joining the batch is not padded onto the others' one-token rows: the cheapest contiguous split of
    the rows by length (a pass costs max(2 F, F + padded rows)), and the rows still decode as alone."""
    assert BatchEngine.passes([1] * 16) == [list(range(16))]  # one pass: reading the weights dominates
    assert BatchEngine.passes([46] + [1] * 15) == [[0], list(range(1, 16))]
    assert BatchEngine.passes([4, 3, 4, 1, 2]) == [[0, 2, 1, 4, 3]]  # a speculative round's rows stay together
    assert BatchEngine.passes([40, 38, 1, 1, 30, 1], overhead=6) == [[0, 1], [4], [2, 3, 5]]
    strategy, shapes = Autoregressive(), []
    forward = tiny.model.forward_layers

    def recorded(hidden, *args, **kwargs):
        shapes.append(tuple(hidden.shape[:2]))
        return forward(hidden, *args, **kwargs)

    engine = BatchEngine(tiny.model, slots=3, capacity=64)
    with torch.inference_mode():
        running = [engine.add(BATCH_PROMPTS[i], strategy, Sampler(sample=False), max_new_tokens=12) for i in (1, 2)]
        for _ in range(3):
            engine.step()
        monkeypatch.setattr(tiny.model, "forward_layers", recorded)
        late = engine.add(list(range(3, 33)), strategy, Sampler(sample=False), max_new_tokens=6)
        engine.step()
        assert sorted(shapes) == [(1, 30), (2, 1)]  # not one pass of [3, 30]
        while engine.running:
            engine.step()
    for sequence, prompt in zip(running + [late], [BATCH_PROMPTS[1], BATCH_PROMPTS[2], list(range(3, 33))]):
        alone = generate_ids(tiny.model, prompt, strategy, Sampler(sample=False),
                             max_new_tokens=len(sequence.new_tokens))
        assert_same_greedy_tokens(tiny, prompt, alone.token_ids, sequence.new_tokens)


def test_greedy_tree_drafts_branch_only_while_a_sequence_decodes_alone(tiny, monkeypatch):
    """In a batch a greedy sequence's last draft position carries one candidate (each candidate is a row), alone
    it branches; the output is the same. A sampled sequence branches in any batch."""
    strategy = SelfSpeculative(2, 2, draft_candidates=3)
    calls = []
    alternatives = Sampler.alternatives

    def counted(self, *args, **kwargs):
        calls.append(self.sample)
        return alternatives(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "alternatives", counted)
    alone = generate_ids(tiny.model, BATCH_PROMPTS[0], strategy, Sampler(sample=False), max_new_tokens=12)
    assert calls and not any(calls)
    calls.clear()
    samplers = [Sampler(sample=False), Sampler(sample=False), Sampler(sample=True, seed=1)]
    engine = BatchEngine(tiny.model, slots=3, capacity=48)
    with torch.inference_mode():
        batch = dict(engine.each(range(3), lambda i: engine.add(BATCH_PROMPTS[i], strategy, samplers[i],
                                                                max_new_tokens=12 if i < 2 else 30)))
    assert_same_greedy_tokens(tiny, BATCH_PROMPTS[0], alone.token_ids, batch[0].new_tokens)
    # The sampled row branched; the greedy rows, never alone (the sampled one outlasts them), never did.
    assert True in calls and False not in calls


@pytest.mark.parametrize("strategy", [Autoregressive(), SelfSpeculative(2, 3), SelfSpeculative(1, 2, draft_candidates=3)],
                         ids=lambda s: str(s.describe()))
def test_a_prompt_in_chunks_decodes_as_in_one_pass(tiny, strategy):
    """prefill_chunk: a long prompt goes through a chunk a round, beside a sequence that decodes meanwhile; both
    give the tokens and statistics they give alone, and a chunk's round is not a round of the statistics."""
    long_prompt, short_prompt = [(7 * i + 3) % 96 for i in range(23)], BATCH_PROMPTS[1]
    alone = [generate_ids(tiny.model, prompt, strategy, Sampler(sample=False), max_new_tokens=10)
             for prompt in (long_prompt, short_prompt)]
    engine = BatchEngine(tiny.model, slots=2, capacity=48, prefill_chunk=5)
    log: list[list[int]] = []

    class Log(Streamer):
        def on_tokens(self, committed, step):
            log.append(committed)

    with torch.inference_mode():
        short = engine.add(short_prompt, strategy, Sampler(sample=False), max_new_tokens=10)
        engine.step()
        long = engine.add(long_prompt, strategy, Sampler(sample=False), max_new_tokens=10, streamer=Log())
        steps = 0
        while not long.new_tokens:
            engine.step()
            steps += 1
        assert steps == 5 and len(short.new_tokens) > 1  # 4 chunks of 5, then the last 3 with the first token
        while engine.running:
            engine.step()
    for sequence, prompt, expected in zip((long, short), (long_prompt, short_prompt), alone):
        assert_same_greedy_tokens(tiny, prompt, expected.token_ids, sequence.new_tokens)
    assert all(log) and long.stats.rounds == alone[0].stats.rounds
