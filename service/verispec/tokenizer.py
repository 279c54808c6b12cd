"""Text <-> token ids for one model directory, chat templates included (shared by every backend)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from verispec.errors import InvalidRequestError, ModelLoadError

_CONTENT = "\x00{}\x00"  # stands for message i's content while the template renders


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
        backend = getattr(self._tok, "backend_tokenizer", None)
        # No token covers more text than its own piece spells (byte-level pieces spell one byte a
        # character); a normalizer may shrink text before the pieces are matched, hence the margin.
        byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
        pieces = max((len(p) if byte_level else len(p.encode()) for p in self._tok.get_vocab()), default=1)
        margin = 1 if backend is not None and backend.normalizer is None else 4
        self.max_token_bytes: int = max(1, pieces) * margin
        specials = [t.content for t in self._tok.added_tokens_decoder.values() if t.special]
        self._control_texts: tuple[str, ...] = tuple(t for t in specials if t)
        self._content_lock = threading.Lock()
        self._content_tok: Any = None

    def warm_up(self) -> None:
        """Builds now what the first request would otherwise wait for: the per-token text table
        (~140 ms of Python) and the content tokenizer (~120 ms, the GIL held throughout)."""
        self.token_text(0)
        self._content_tokenizer()

    def add_eos_token_ids(self, token_ids: Sequence[int]) -> None:
        """Adds end-of-sequence ids the model's generation config declares."""
        self.eos_token_ids = self.eos_token_ids | frozenset(token_ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of raw text, with the special tokens the model expects at the start.

        Control-token text in `text` becomes control tokens: a raw prompt keeps full control.
        """
        ids: list[int] = self._tok(text)["input_ids"]
        return ids

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the chat template, ready for the reply.

        Content is text: control-token text inside it (`<|im_end|>`) is tokenized as plain text, so
        a message cannot forge a turn. Conversations without such text are rendered and tokenized
        in one piece, exactly as the template says.
        """
        if not self.has_chat_template:
            raise InvalidRequestError("messages", "this model has no chat template; send a prompt")
        if not any(control in content for _, content in messages for control in self._control_texts):
            ids: list[int] = self._tok(self._render(messages), add_special_tokens=False)["input_ids"]
            return ids
        # Render with a stand-in for each content, then tokenize the template's text with its control
        # tokens and each content on its own with control-token text treated as text.
        rendered = self._render([(role, _CONTENT.format(i)) for i, (role, _) in enumerate(messages)])
        ids = []
        for i, (_, content) in enumerate(messages):
            before, found, rendered = rendered.partition(_CONTENT.format(i))
            if not found or _CONTENT.format(i) in rendered:
                raise InvalidRequestError(
                    f"messages[{i}].content", "holds control-token text this template cannot take"
                )
            ids += self._tok(before, add_special_tokens=False)["input_ids"] if before else []
            ids += self._content_tokenizer().encode_batch([content], add_special_tokens=False)[0].ids
        ids += self._tok(rendered, add_special_tokens=False)["input_ids"] if rendered else []
        return ids

    def _render(self, messages: Sequence[tuple[str, str]]) -> str:
        conversation = [{"role": role, "content": content} for role, content in messages]
        try:
            rendered: str = self._tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja errors carry the template's own message
            raise InvalidRequestError("messages", f"chat template rejected the messages: {exc}") from exc
        return rendered

    def _content_tokenizer(self) -> Any:
        """A copy of the backend tokenizer that reads control-token text as text (made on first use:
        flipping the shared tokenizer's setting would race with other threads)."""
        with self._content_lock:
            if self._content_tok is None:
                from tokenizers import Tokenizer as BackendTokenizer

                copy = BackendTokenizer.from_str(self._tok.backend_tokenizer.to_str())
                copy.encode_special_tokens = True
                self._content_tok = copy
            return self._content_tok

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens left out."""
        text: str = self._tok.decode(list(token_ids), skip_special_tokens=True)
        return text

    def token_text(self, token_id: int) -> str:
        """The text of one token as it would print (special tokens shown)."""
        texts = self._token_texts
        return texts[token_id] if 0 <= token_id < len(texts) else self._decode_one(token_id)

    @functools.cached_property
    def _token_texts(self) -> list[str]:
        """Every token's text, decoded once: a long Tokenize answer costs a lookup per token."""
        return [self._decode_one(token_id) for token_id in range(len(self._tok))]

    def _decode_one(self, token_id: int) -> str:
        text: str = self._tok.decode([token_id], skip_special_tokens=False)
        return text

    def same_vocabulary(self, other: Tokenizer) -> bool:
        """True when both tokenizers map every token to the same id."""
        mine: dict[str, int] = self._tok.get_vocab()
        theirs: dict[str, int] = other._tok.get_vocab()
        return mine == theirs
