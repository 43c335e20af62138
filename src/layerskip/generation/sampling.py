"""Token choice: greedy, warped sampling, and the speculative accept/reject rules.

Draft (q) and target (p) distributions go through the same warping (temperature, top-k, top-p), so
speculative rejection sampling yields exactly the distribution of plain sampling from warped p.
"""

from __future__ import annotations

import torch


NUCLEUS_CANDIDATES = 512


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

    def verify(self, drafts: list[int], draft_probs: list[torch.Tensor | None],
               target_logits: torch.Tensor) -> tuple[int, int]:
        """Accept a prefix of the drafts against target logits [len(drafts) + 1, vocab].

        Returns (number of drafts accepted, the token that follows them: the correction at the
        first rejection, or a bonus token when every draft was accepted).
        """
        if not self.sample:
            targets = target_logits.argmax(dim=-1).tolist()
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
                accepted += 1
            return accepted, targets[accepted]
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
                residual = (target_probs[accepted] - q[accepted]).clamp_min(0.0)
                total = residual.sum()
                return accepted, self.draw(residual / total if total > 0 else target_probs[accepted])
        else:
            accepted = 0
        return accepted, self.draw(target_probs[accepted])
