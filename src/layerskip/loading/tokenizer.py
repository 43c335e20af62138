"""A thin wrapper over a transformers tokenizer: encoding, decoding and chat templates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerskip.errors import LayerSkipError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class Tokenizer:
    def __init__(self, hf_tokenizer: Any):
        self.hf = hf_tokenizer

    @classmethod
    def from_folder(cls, folder: Path) -> "Tokenizer | None":
        """The folder's tokenizer, or None when it ships none (then decoding takes token ids only); a
        LayerSkipError when its files are there but unreadable."""
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(str(folder)))
        except Exception as error:  # transformers and tokenizers raise many types for broken files
            detail = " ".join(str(error).split())[:200] or type(error).__name__
            raise LayerSkipError(f"cannot read the tokenizer in {folder}: {detail}") from None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template, ready for the reply; a LayerSkipError
        when the template refuses the conversation (some require alternating roles)."""
        from jinja2 import TemplateError

        try:
            text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as error:
            raise LayerSkipError(f"the model's chat template refused the conversation: {error}") from None
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, token_ids: list[int]) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=True)

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's own text, for displays that colour tokens one by one."""
        return [self.hf.decode([token], skip_special_tokens=True) for token in token_ids]
