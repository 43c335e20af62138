"""Token choice: greedy, warped sampling, and the speculative accept/reject rules.

Draft (q) and target (p) distributions go through the same warping (temperature, top-k, top-p), so
speculative rejection sampling yields exactly the distribution of plain sampling from warped p.

A round's last draft position may carry several candidates (a tree of one level): greedy takes the next most
likely drafts, sampling draws them from q without replacement, and verification tries them in turn by recursive
rejection sampling. Each try is an exact speculative step for what the earlier rejections left of p (the residual
max(p - q_j, 0), normalised) with that candidate's own draft distribution q_j (q without the earlier candidates),
so the output is still exactly distributed as p.
"""

from __future__ import annotations

import dataclasses

import torch


NUCLEUS_CANDIDATES = 512


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What verification kept of a round's drafts."""

    accepted: int      # drafts accepted, in order
    next_token: int    # the correction at the first rejection, or the bonus token after the last accepted draft
    candidate: int = 0  # which candidate the last accepted position took: 0 its draft, i >= 1 alternatives[i - 1]


def without(probs: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """A distribution with these tokens removed, renormalised (all zeros when nothing is left)."""
    rest = probs.clone()
    rest[tokens] = 0.0
    total = rest.sum()
    return rest / total if total > 0 else rest


class Sampler:
    def __init__(self, *, sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, device: torch.device | str = "cpu"):
        self.sample = sample and temperature > 0
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities after temperature, then top-k, then top-p (nucleus), over the last axis."""
        logits = logits.float() / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth_best = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth_best, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            # The nucleus is a prefix of the tokens by probability: the most likely few hundred hold it almost
            # always, and ranking them costs 0.1 ms where sorting a 49k vocabulary costs 3 ms a token.
            sorted_probs, order = torch.topk(probs, min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
            if bool((sorted_probs.sum(dim=-1) < self.top_p).any()):  # a flat distribution: rank them all
                sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(mass_before >= self.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    def draw(self, probs: torch.Tensor) -> int:
        """One token from a distribution, by inverting its cumulative sum at a uniform draw: exact, and 20 us where
        torch.multinomial over a 49k vocabulary takes 0.75 ms (a speculative round draws twice)."""
        flat = probs.reshape(-1)
        cumulative = flat.double().cumsum(0)
        target = torch.rand(1, generator=self.generator, device=probs.device, dtype=torch.float64) * cumulative[-1]
        token = min(int(torch.searchsorted(cumulative, target, right=True)), len(cumulative) - 1)
        if flat[token] <= 0:  # a uniform within rounding of 1 ran past the last likely token
            token = int(flat.nonzero()[-1])
        return token

    def choose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """One token from a single position's logits, and the warped distribution it came from (None if greedy)."""
        if not self.sample:
            return int(logits.reshape(-1).argmax()), None
        probs = self.warp(logits.reshape(-1))
        return self.draw(probs), probs

    def alternatives(self, logits: torch.Tensor, probs: torch.Tensor | None, first: int, count: int) -> list[int]:
        """Up to `count` more candidates for a draft position whose draft is `first`: greedy, the next most likely
        tokens; sampling, draws without replacement from q (`probs`), each from q without the ones before."""
        if not self.sample:
            flat = logits.reshape(-1)
            best = torch.topk(flat, min(count + 1, flat.shape[-1]))
            ranked = [int(t) for t, v in zip(best.indices, best.values) if v > float("-inf") and int(t) != first]
            return ranked[:count]
        chosen = [first]
        for _ in range(count):
            rest = without(probs, chosen)
            if not bool(rest.any()):
                break
            chosen.append(self.draw(rest))
        return chosen[1:]

    def verify(self, drafts: list[int], draft_probs: list[torch.Tensor | None], target_logits: torch.Tensor,
               alternatives: list[int] = (), alternative_logits: torch.Tensor | None = None) -> Verdict:
        """Accept a prefix of the drafts against target logits [len(drafts) + 1, vocab] (row i scores the position
        of drafts[i]; the last row, the position after them).

        `alternatives` are further candidates for the last draft's position (from `alternatives()`), and
        `alternative_logits` [len(alternatives), vocab] the target's rows after each: when the last draft is
        rejected they are tried in turn, and the one accepted brings its own bonus token.
        """
        if not self.sample:
            targets = target_logits.argmax(dim=-1).tolist()
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
                accepted += 1
            if accepted == len(drafts) - 1 and targets[accepted] in alternatives:
                index = alternatives.index(targets[accepted])
                return Verdict(accepted + 1, int(alternative_logits[index].argmax()), index + 1)
            return Verdict(accepted, targets[accepted])
        target_probs = self.warp(target_logits)
        if drafts:
            index = torch.arange(len(drafts), device=target_probs.device)
            tokens = torch.tensor(drafts, device=target_probs.device)
            q = torch.stack(draft_probs)  # type: ignore[arg-type]
            p_of_draft, q_of_draft = target_probs[index, tokens], q[index, tokens]
            uniforms = torch.rand(len(drafts), generator=self.generator, device=target_probs.device)
            keep = (uniforms * q_of_draft < p_of_draft).tolist()
            accepted = keep.index(False) if False in keep else len(drafts)
            if accepted < len(drafts):
                residual = self.residual(target_probs[accepted], q[accepted])
                if accepted == len(drafts) - 1 and alternatives:
                    return self.try_alternatives(accepted, drafts[-1], q[-1], residual, alternatives,
                                                 alternative_logits)
                return Verdict(accepted, self.draw(residual))
        else:
            accepted = 0
        return Verdict(accepted, self.draw(target_probs[accepted]))

    @staticmethod
    def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """What a rejection leaves of p: max(p - q, 0), normalised (p itself if rounding left nothing)."""
        residual = (p - q).clamp_min(0.0)
        total = residual.sum()
        return residual / total if total > 0 else p

    def try_alternatives(self, position: int, first: int, q: torch.Tensor, p: torch.Tensor, alternatives: list[int],
                         alternative_logits: torch.Tensor) -> Verdict:
        """Recursive rejection sampling over the other candidates of draft `position`, whose draft `first` (drawn
        from q) was rejected, leaving p of the target."""
        tried = [first]
        for index, token in enumerate(alternatives):
            q_j = without(q, tried)
            uniform = torch.rand(1, generator=self.generator, device=p.device)
            if bool(uniform * q_j[token] < p[token]):
                return Verdict(position + 1, self.draw(self.warp(alternative_logits[index])), index + 1)
            p = self.residual(p, q_j)
            tried.append(token)
        return Verdict(position, self.draw(p))
