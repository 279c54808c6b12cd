"""Text <-> token ids for one model directory, chat templates included (shared by every backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from verispec.errors import InvalidRequestError, ModelLoadError


class Tokenizer:
    """A model's tokenizer: encode prompts, render chats, decode generated ids."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok: Any = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc
        eos = self._tok.eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset([eos] if eos is not None else [])
        self.vocab_size: int = len(self._tok)
        self.has_chat_template: bool = bool(getattr(self._tok, "chat_template", None))

    def add_eos_token_ids(self, token_ids: Sequence[int]) -> None:
        """Adds end-of-sequence ids the model's generation config declares."""
        self.eos_token_ids = self.eos_token_ids | frozenset(token_ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of raw text, with the special tokens the model expects at the start."""
        ids: list[int] = self._tok(text)["input_ids"]
        return ids

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the chat template, ready for the reply."""
        if not self.has_chat_template:
            raise InvalidRequestError("messages", "this model has no chat template; send a prompt")
        conversation = [{"role": role, "content": content} for role, content in messages]
        try:
            rendered = self._tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja errors carry the template's own message
            raise InvalidRequestError("messages", f"chat template rejected the messages: {exc}") from exc
        ids: list[int] = self._tok(rendered, add_special_tokens=False)["input_ids"]
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens left out."""
        text: str = self._tok.decode(list(token_ids), skip_special_tokens=True)
        return text

    def token_text(self, token_id: int) -> str:
        """The text of one token as it would print (special tokens shown)."""
        text: str = self._tok.decode([token_id], skip_special_tokens=False)
        return text

    def same_vocabulary(self, other: Tokenizer) -> bool:
        """True when both tokenizers map every token to the same id."""
        mine: dict[str, int] = self._tok.get_vocab()
        theirs: dict[str, int] = other._tok.get_vocab()
        return mine == theirs
