"""Warping values, and speculative sampling reproducing plain sampling's distribution exactly."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from layerskip.generation import Autoregressive, BatchEngine, Sampler, SelfSpeculative, Verdict, generate_ids
from layerskip.model import ModelConfig, Transformer


def test_temperature_top_k_top_p_warping_exact_values():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    top_k = Sampler(sample=True, temperature=1.0, top_k=3).warp(logits)
    assert torch.allclose(top_k, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    # Nucleus 0.7: 0.5 alone is below 0.7, 0.5 + 0.2 reaches it, so exactly the two best remain.
    top_p = Sampler(sample=True, temperature=1.0, top_p=0.7).warp(logits)
    assert torch.allclose(top_p, torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7)
    # Temperature 0.5 squares the probabilities before normalising.
    hot = Sampler(sample=True, temperature=0.5).warp(logits)
    squares = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    assert torch.allclose(hot, squares / squares.sum())


def test_nucleus_from_the_most_likely_candidates_equals_a_full_sort():
    """Peaked rows keep their nucleus among the candidates ranked; flat ones (a nucleus of thousands) rank all."""
    generator = torch.Generator().manual_seed(0)
    sampler = Sampler(sample=True, temperature=0.7, top_p=0.9)
    for scale in (6.0, 0.01):
        logits = torch.randn(3, 5000, generator=generator) * scale
        probs = torch.softmax(logits / 0.7, dim=-1)
        ordered, order = torch.sort(probs, dim=-1, descending=True)
        kept = ordered.masked_fill(ordered.cumsum(-1) - ordered >= 0.9, 0.0)
        expected = torch.zeros_like(probs).scatter_(-1, order, kept)
        nucleus = (expected > 0).sum(-1)
        assert (nucleus < 512).all() if scale > 1 else (nucleus > 512).all()
        assert torch.allclose(sampler.warp(logits), expected / expected.sum(-1, keepdim=True), atol=1e-7)


def test_draw_follows_the_distribution_and_never_picks_an_impossible_token():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    sampler = Sampler(sample=True, seed=1)
    counts = torch.bincount(torch.tensor([sampler.draw(probs) for _ in range(20000)]), minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    assert chisquare(counts[[1, 3, 4]].tolist(), [10000, 6000, 4000]).pvalue > 0.001


def test_greedy_verify_accepts_the_matching_prefix():
    sampler = Sampler(sample=False)
    targets = torch.full((4, 6), -1.0)
    targets[0, 2] = targets[1, 5] = targets[2, 1] = targets[3, 0] = 1.0  # argmaxes 2, 5, 1, 0
    assert sampler.verify([2, 5, 3], [None] * 3, targets) == Verdict(2, 1)
    assert sampler.verify([2, 5, 1], [None] * 3, targets) == Verdict(3, 0)
    assert sampler.verify([4, 5, 1], [None] * 3, targets) == Verdict(0, 2)


def test_greedy_alternatives_are_the_next_most_likely_and_bring_their_own_bonus_token():
    sampler = Sampler(sample=False)
    draft_logits = torch.tensor([0.1, 3.0, float("-inf"), 2.0, 2.5, 0.0])
    assert sampler.alternatives(draft_logits, None, 1, 2) == [4, 3]
    assert sampler.alternatives(draft_logits, None, 1, 9) == [4, 3, 0, 5]  # never a token outside the draft slice
    targets = torch.full((2, 6), -1.0)
    targets[0, 2] = targets[1, 0] = 1.0  # the target takes 2, then 0 after the first draft
    after = torch.full((2, 6), -1.0)
    after[0, 5] = after[1, 4] = 1.0      # rows after the alternatives [3, 2]
    assert sampler.verify([1], [None], targets, [3, 2], after) == Verdict(1, 4, candidate=2)
    assert sampler.verify([1], [None], targets, [3, 5], after) == Verdict(0, 2)
    assert sampler.verify([2], [None], targets, [3, 5], after) == Verdict(1, 0)  # the draft itself: no alternative


def test_sampled_alternatives_are_drawn_without_replacement_from_q():
    q = torch.tensor([0.5, 0.3, 0.0, 0.2])
    sampler = Sampler(sample=True, seed=3)
    seconds = [0] * 4
    for _ in range(3000):
        drawn = sampler.alternatives(torch.zeros(4), q, 0, 5)
        assert sorted(drawn) == [1, 3]  # every other possible token once, never the first or an impossible one
        seconds[drawn[0]] += 1
    # The first alternative follows q without token 0: 0.6 / 0.4.
    assert chisquare([seconds[1], seconds[3]], [1800, 1200]).pvalue > SIGNIFICANCE_UNIT


SIGNIFICANCE_UNIT = 0.001
VOCAB = 8
SETTINGS = dict(sample=True, temperature=0.8, top_k=6, top_p=0.95)


@pytest.fixture(scope="module")
def tiny_model() -> Transformer:
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                         rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(11)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0.0, 0.4)
    return model


PROMPT = [1, 4, 2]


def exact_two_token_distribution(model: Transformer, exit_layer: int | None = None) -> dict[tuple[int, int], float]:
    """P(t1, t2) of plain sampling from the warped model, by enumeration."""
    warp = Sampler(**SETTINGS).warp
    with torch.inference_mode():
        first = warp(model(torch.tensor([PROMPT]), exit_layer=exit_layer)[0, -1])
        table = {}
        for t1 in range(VOCAB):
            second = warp(model(torch.tensor([PROMPT + [t1]]), exit_layer=exit_layer)[0, -1])
            for t2 in range(VOCAB):
                table[(t1, t2)] = float(first[t1] * second[t2])
    return table


def empirical_counts(model: Transformer, strategy, runs: int) -> dict[tuple[int, int], int]:
    counts = dict.fromkeys(itertools.product(range(VOCAB), repeat=2), 0)
    for seed in range(runs):
        result = generate_ids(model, PROMPT, strategy, Sampler(**SETTINGS, seed=seed), max_new_tokens=2)
        counts[tuple(result.token_ids)] += 1
    return counts


def chi_square_p_value(counts: dict, probabilities: dict) -> float:
    """Pearson's test against exact probabilities; cells expected under 5 times are pooled."""
    runs = sum(counts.values())
    observed, expected, pooled_observed, pooled_expected = [], [], 0, 0.0
    for cell, probability in probabilities.items():
        if probability * runs >= 5:
            observed.append(counts[cell])
            expected.append(probability * runs)
        else:
            pooled_observed += counts[cell]
            pooled_expected += probability * runs
    if pooled_observed and not pooled_expected:
        return 0.0  # outcomes that plain sampling can never produce
    if pooled_expected > 0:
        observed.append(pooled_observed)
        expected.append(pooled_expected)
    scale = runs / sum(expected)  # float32 probabilities sum to 1 only up to rounding
    return float(chisquare(observed, [e * scale for e in expected]).pvalue)


RUNS = 2000
SIGNIFICANCE = 0.001


def test_speculative_sampling_matches_plain_sampling_distribution(tiny_model):
    exact = exact_two_token_distribution(tiny_model)
    # The draft (1 of 3 layers) is a genuinely different distribution: the test has power.
    draft = exact_two_token_distribution(tiny_model, exit_layer=1)
    assert 0.5 * sum(abs(exact[c] - draft[c]) for c in exact) > 0.15
    tiny_model.set_draft_vocab([6, 2, 0, 5, 1, 3, 7, 4])
    # Drafts from a 5-token slice of the head (q is 0 for the other 3), stopping after an unsure draft.
    sliced = SelfSpeculative(exit_layer=1, num_speculations=3, draft_vocab_size=5, draft_confidence=0.4)
    for strategy in (SelfSpeculative(exit_layer=1, num_speculations=2), SelfSpeculative(exit_layer=2, num_speculations=1),
                     sliced):
        counts = empirical_counts(tiny_model, strategy, RUNS)
        assert chi_square_p_value(counts, exact) > SIGNIFICANCE, strategy.describe()
    # Plain sampling passes the same test, and sampling from the draft would fail it.
    assert chi_square_p_value(empirical_counts(tiny_model, Autoregressive(), RUNS), exact) > SIGNIFICANCE
    assert chi_square_p_value(empirical_counts(tiny_model, Autoregressive(exit_layer=1), RUNS), exact) < SIGNIFICANCE


@pytest.mark.parametrize("kind, candidates", [("layer", 1), ("mlp", 1), ("layer", 3)])
def test_speculative_sampling_with_a_draft_adapter_matches_plain_sampling(tiny_model, kind, candidates):
    """Drafts through an adapter (random: a distribution of its own) still give exactly plain sampling's. With an
    adapter the prompt's round drafts nothing, so the test counts tokens 2 and 3 of 3, which a round drafts."""
    from layerskip.model.draft_adapter import DraftAdapter, DraftAdapterConfig

    torch.manual_seed(5)
    adapter = DraftAdapter(DraftAdapterConfig(exit_layer=1, hidden_size=32, kind=kind, intermediate_size=16),
                           tiny_model.config).eval()
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    warp = Sampler(**SETTINGS).warp
    exact = dict.fromkeys(itertools.product(range(VOCAB), repeat=2), 0.0)
    with torch.inference_mode():
        first = warp(tiny_model(torch.tensor([PROMPT]))[0, -1])
        for t1 in range(VOCAB):
            second = warp(tiny_model(torch.tensor([PROMPT + [t1]]))[0, -1])
            for t2 in range(VOCAB):
                third = warp(tiny_model(torch.tensor([PROMPT + [t1, t2]]))[0, -1])
                for t3 in range(VOCAB):
                    exact[(t2, t3)] += float(first[t1] * second[t2] * third[t3])
    strategy = SelfSpeculative(exit_layer=1, num_speculations=2, draft_adapter=adapter, draft_candidates=candidates)
    counts = dict.fromkeys(exact, 0)
    drafted = 0
    for seed in range(RUNS):
        result = generate_ids(tiny_model, PROMPT, strategy, Sampler(**SETTINGS, seed=seed), max_new_tokens=3)
        counts[tuple(result.token_ids[1:])] += 1
        drafted += result.stats.drafted_tokens
    assert drafted >= RUNS
    assert chi_square_p_value(counts, exact) > SIGNIFICANCE


def test_tree_drafts_sampling_matches_plain_sampling(tiny_model):
    """Several candidates at the last draft position, tried by recursive rejection sampling, with and without a
    draft slice: still exactly plain sampling's distribution; and the alternatives were used. (Two tokens leave a
    budget of one draft; the adapter test below covers a chain with candidates after it.)"""
    from layerskip.generation.sampling import Verdict as Kept

    class Recording(Sampler):
        taken = 0

        def verify(self, *args, **kwargs) -> Kept:
            verdict = super().verify(*args, **kwargs)
            Recording.taken += verdict.candidate > 0
            return verdict

    exact = exact_two_token_distribution(tiny_model)
    tiny_model.set_draft_vocab([6, 2, 0, 5, 1, 3, 7, 4])
    for strategy in (SelfSpeculative(exit_layer=2, num_speculations=1, draft_candidates=3),
                     SelfSpeculative(exit_layer=2, num_speculations=1, draft_candidates=4, draft_vocab_size=5)):
        Recording.taken = 0
        counts = dict.fromkeys(exact, 0)
        for seed in range(RUNS):
            result = generate_ids(tiny_model, PROMPT, strategy, Recording(**SETTINGS, seed=seed), max_new_tokens=2)
            counts[tuple(result.token_ids)] += 1
        assert Recording.taken > RUNS // 20, strategy.describe()  # about 1 in 6 rounds
        assert chi_square_p_value(counts, exact) > SIGNIFICANCE, strategy.describe()


def test_rows_of_a_batch_sample_from_plain_samplings_distribution(tiny_model):
    """Speculative rows (tree drafts) in a batch of 8, beside companions with other prompts, joining as slots free
    up: the prompt's rows follow plain sampling's distribution, in every slot."""
    exact = exact_two_token_distribution(tiny_model)
    strategy = SelfSpeculative(exit_layer=1, num_speculations=2, draft_candidates=2)
    companions = [[3], [5, 6, 7, 1], [2, 2]]
    engine = BatchEngine(tiny_model, slots=8, capacity=16)

    def add(index: int):
        prompt = PROMPT if index % 2 == 0 else companions[index // 2 % len(companions)]
        return engine.add(prompt, strategy, Sampler(**SETTINGS, seed=index), max_new_tokens=2 + index % 3)

    counts, slots = dict.fromkeys(itertools.product(range(VOCAB), repeat=2), 0), set()
    with torch.inference_mode():
        for index, sequence in engine.each(range(2 * RUNS), add):
            if index % 2 == 0:
                counts[tuple(sequence.new_tokens[:2])] += 1
                slots.add(sequence.slot)
    assert slots == set(range(8)) and sum(counts.values()) == RUNS
    assert chi_square_p_value(counts, exact) > SIGNIFICANCE
