"""When to stop: EOS ids, stop token ids, stop words (matched across token boundaries), length limits.

Tokens are offered one at a time, also when a speculative round commits several at once, so every
strategy stops at exactly the same token.
"""

from __future__ import annotations

from typing import Sequence

from layerskip.loading.tokenizer import Tokenizer


def cut_at_stop_words(text: str, stop_words: Sequence[str]) -> tuple[str, bool]:
    """The text before the earliest stop word, and whether one was found."""
    cuts = [i for i in (text.find(word) for word in stop_words) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


class StoppingCriteria:
    def __init__(self, *, eos_token_ids: Sequence[int], stop_token_ids: Sequence[int] = (),
                 stop_words: Sequence[str] = (), max_new_tokens: int, max_length: int,
                 tokenizer: Tokenizer | None = None):
        self.eos_token_ids = set(eos_token_ids)
        self.stop_token_ids = set(stop_token_ids)
        self.stop_words = [word for word in stop_words if word]
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length
        self.tokenizer = tokenizer
        # A stop word of c characters ends within the last c tokens; the slack covers tokens that
        # decode to nothing (special tokens, partial UTF-8 bytes).
        self.window = 2 * max((len(word) for word in self.stop_words), default=0) + 4

    def finish_reason(self, new_tokens: list[int], total_length: int) -> str | None:
        """Why decoding must stop after the newest token, or None to go on."""
        token = new_tokens[-1]
        if token in self.eos_token_ids:
            return "eos"
        if token in self.stop_token_ids:
            return "stop_token"
        if self.stop_words and self.tokenizer is not None:
            if cut_at_stop_words(self.tokenizer.decode(new_tokens[-self.window:]), self.stop_words)[1]:
                return "stop_word"
        if len(new_tokens) >= self.max_new_tokens:
            return "max_steps"
        if total_length >= self.max_length:
            return "context_length"
        return None
