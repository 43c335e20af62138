"""Streamers print text as rounds are committed.

`TextStreamer` prints the new text, holding back what could still turn out to be the start of a stop
word (or half of a multi-byte character). `SpeculativeStreamer` also shows each round's drafts and
marks which were accepted: accepted drafts green, rejected drafts red and struck through, and the
verifier's own token plain (without colour: rejected drafts as ~~text~~).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Sequence, TextIO

from layerskip.generation.stopping import cut_at_stop_words
from layerskip.loading.tokenizer import Tokenizer

if TYPE_CHECKING:
    from layerskip.generation.engine import GenerationResult
    from layerskip.generation.strategies import Round

GREEN, RED_STRUCK, DIM, RESET = "\x1b[32m", "\x1b[9;31m", "\x1b[2m", "\x1b[0m"
SAVE_CURSOR, RESTORE_AND_CLEAR = "\x1b7", "\x1b8\x1b[J"


class Streamer:
    """No-op base: override what you need."""

    def on_draft(self, drafts: list[int]) -> None:
        """Drafts of the current round, before verification."""

    def on_tokens(self, committed: list[int], step: "Round") -> None:
        """Tokens committed by a round (cut short when a stop condition fired)."""

    def on_end(self, result: "GenerationResult") -> None:
        """Decoding finished; `result.text` is final."""


class TextStreamer(Streamer):
    def __init__(self, tokenizer: Tokenizer, stop_words: Sequence[str] = (), out: TextIO | None = None):
        self.tokenizer = tokenizer
        self.stop_words = list(stop_words)
        self.holdback = max((len(word) for word in self.stop_words), default=1) - 1
        self.out = out or sys.stdout
        self.token_ids: list[int] = []
        self.printed = 0

    def safe_text(self) -> str:
        """Committed text that no later token can change or cut."""
        text, stopped = cut_at_stop_words(self.tokenizer.decode(self.token_ids), self.stop_words)
        if not stopped:
            text = text[:max(len(text) - self.holdback, 0)]
        return text.rstrip("\ufffd")

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def on_tokens(self, committed: list[int], step: "Round") -> None:
        self.token_ids.extend(committed)
        text = self.safe_text()
        if len(text) > self.printed:
            self.write(text[self.printed:])
            self.printed = len(text)

    def on_end(self, result: "GenerationResult") -> None:
        self.write((result.text or "")[self.printed:] + "\n")


class SpeculativeStreamer(TextStreamer):
    def __init__(self, tokenizer: Tokenizer, stop_words: Sequence[str] = (), out: TextIO | None = None,
                 color: bool | None = None):
        super().__init__(tokenizer, stop_words, out)
        self.color = self.out.isatty() if color is None else color

    def on_draft(self, drafts: list[int]) -> None:
        if self.color:
            self.write(SAVE_CURSOR + DIM + "".join(self.tokenizer.token_texts(drafts)) + RESET)

    def on_tokens(self, committed: list[int], step: "Round") -> None:
        if self.color and step.drafted:
            self.write(RESTORE_AND_CLEAR)
        accepted = self.tokenizer.token_texts(step.drafted[:step.accepted_drafts])
        rejected = self.tokenizer.token_texts(step.drafted[step.accepted_drafts:])
        own = self.tokenizer.token_texts(committed[step.accepted_drafts:])
        accepted = accepted[:len(committed)]
        if self.color:
            shown = GREEN + "".join(accepted) + RESET + (RED_STRUCK + "".join(rejected) + RESET if rejected else "")
        else:
            shown = "".join(accepted) + (f"~~{''.join(rejected)}~~" if rejected else "")
        self.write(shown + "".join(own))
        self.token_ids.extend(committed)

    def on_end(self, result: "GenerationResult") -> None:
        self.write("\n")
