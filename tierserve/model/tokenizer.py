"""The checkpoint's tokenizer and chat template: text <-> ids, chat rendering, streaming decode.

Built from a GGUF file's metadata (see ``tokenizer_gguf``) or an HF folder's tokenizer.json, on
the ``tokenizers`` library; transformers is only the reference the tests compare against.
"""

from __future__ import annotations

import json
import logging
import os
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from tierserve.model.chat_template import ChatTemplateError, render_chat_template
from tierserve.model.tokenizer_gguf import (
    bos_eos_post_processor,
    build_gguf_tokenizer,
    bytes_to_unicode,
)

log = logging.getLogger(__name__)

# Tokens that close a turn in common chat formats. One becomes a stop token when the chat template
# writes it (SmolLM2/Qwen "<|im_end|>", Llama 3 "<|eot_id|>", Phi-3 "<|end|>", Gemma ...).
END_OF_TURN_TOKENS = tuple(
    "<|im_end|> <|eot_id|> <|eom_id|> <|end|> <end_of_turn> <|endoftext|> <|return|> <|call|> "
    "<\uff5cend\u2581of\u2581sentence\uff5c>".split()
)
# Names transformers passes to a chat template (its special_tokens_map), when the token is set.
SPECIAL_TOKEN_NAMES = tuple(
    "bos_token eos_token unk_token sep_token pad_token cls_token mask_token".split()
)


class Tokenizer:
    """Text <-> token ids and chat rendering for one checkpoint.

    Build it with ``from_path`` (a .gguf file or an HF folder), ``from_gguf`` or
    ``from_pretrained_dir``. Ids match transformers' tokenizer for the same files.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: dict[str, str],
        add_bos: bool,
        chat_template: str | None,
        extra_stop_ids: set[int] | None = None,
        clean_up_tokenization_spaces: bool = False,
        source: str = "",
    ) -> None:
        self.backend = backend
        self.special_tokens = special_tokens  # e.g. {"bos_token": "<|im_start|>", ...}
        self.bos_token_id = self._id_of("bos_token")
        self.eos_token_id = self._id_of("eos_token")
        self.unk_token_id = self._id_of("unk_token")
        self.pad_token_id = self._id_of("pad_token")
        self.add_bos = add_bos and self.bos_token_id is not None
        self.chat_template = chat_template
        self.source = source
        self.stop_token_ids = self._stop_ids(extra_stop_ids or set())
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        self._byte_level = b'"ByteLevel"' in (
            backend.decoder.__getstate__() if backend.decoder else b""
        )
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> Tokenizer:
        """A .gguf file, an HF folder with tokenizer.json, or a folder holding one .gguf file."""
        path = Path(path)
        if path.is_file() and path.suffix == ".gguf":
            return cls.from_gguf(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                return cls.from_pretrained_dir(path)
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return cls.from_gguf(ggufs[0])
        raise FileNotFoundError(
            f"no tokenizer at {path}: pass a .gguf file or a folder with tokenizer.json "
            "(write one with transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir))"
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's ``tokenizer.*`` metadata."""
        from tierserve.model.gguf_file import read_gguf  # numpy + gguf, only for GGUF checkpoints

        return cls.from_gguf_metadata(read_gguf(path).metadata, source=str(path))

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], source: str = "") -> Tokenizer:
        """Same as ``from_gguf``, from metadata already read (``read_gguf(path).metadata``)."""
        parts = build_gguf_tokenizer(metadata)
        return cls(
            parts.backend,
            special_tokens=parts.special_tokens,
            add_bos=parts.add_bos,
            chat_template=parts.chat_template,
            extra_stop_ids=parts.extra_stop_ids,
            source=source,
        )

    @classmethod
    def from_pretrained_dir(cls, folder: str | os.PathLike) -> Tokenizer:
        """Load tokenizer.json plus tokenizer_config.json (special tokens, chat template,
        add_bos_token, added_tokens_decoder), chat_template.jinja and generation_config.json."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{folder} has no tokenizer.json; write one with transformers: "
                "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)"
            )
        backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        special_tokens = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = _token_content(config.get(name, special_map.get(name)))
            if content is not None:
                special_tokens[name] = content
        _ensure_added_tokens(
            backend, config.get("added_tokens_decoder", {}), special_tokens.values()
        )
        add_bos = _resolve_add_bos(backend, config, special_tokens)
        eos_ids = _read_json(folder / "generation_config.json").get("eos_token_id")
        extra_stop = set(eos_ids) if isinstance(eos_ids, list) else {eos_ids} - {None}
        return cls(
            backend,
            special_tokens=special_tokens,
            add_bos=add_bos,
            chat_template=_read_chat_template(folder, config),
            extra_stop_ids=extra_stop,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            source=str(folder),
        )

    def save(self, folder: str | os.PathLike) -> None:
        """Write this tokenizer as an HF folder's files (tokenizer.json, tokenizer_config.json
        with the special tokens and chat template, generation_config.json's stop ids), which
        ``from_pretrained_dir`` reads back to the same tokenizer: a GGUF's, for example, beside
        weights written as safetensors (tierserve moefy)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {**self.special_tokens, "add_bos_token": self.add_bos,
                  "clean_up_tokenization_spaces": self._clean_up}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        generation = {"eos_token_id": sorted(self.stop_token_ids)}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))

    # ---- text <-> ids -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the bos/eos the checkpoint asks for.
        Special tokens written in the text (e.g. ``"<|im_start|>"``) are always matched whole."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; bytes that do not form a whole UTF-8 character come out as U+FFFD."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def token_to_id(self, token: str) -> int | None:
        """Id of a token spelled as in the vocabulary (``"<|im_end|>"``, ``"Ġworld"``)."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary spelling of ``token_id`` (byte-level tokens in GPT-2's alphabet)."""
        return self.backend.id_to_token(token_id)

    def token_to_bytes(self, token_id: int) -> bytes:
        """The raw bytes ``token_id`` stands for (one byte of a UTF-8 character, for some)."""
        if token_id in self._added:
            return self._added[token_id].encode()
        token = self.backend.id_to_token(token_id)
        if token is None:
            raise IndexError(
                f"token id {token_id} is outside the vocabulary (size {self.vocab_size})"
            )
        if self._byte_level:
            return bytes(_unicode_to_byte()[c] for c in token)
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return bytes([int(token[3:5], 16)])  # SentencePiece byte-fallback token
        return token.replace("\u2581", " ").encode()

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` to the prompt text, as transformers'
        ``apply_chat_template(messages, tokenize=False)`` does. ``chat_template`` overrides the
        checkpoint's; extra kwargs become template variables."""
        template = chat_template or self.chat_template
        if template is None:
            raise ChatTemplateError(
                f"{self.source or 'this tokenizer'} has no chat template; pass one "
                "(apply_chat_template(..., chat_template=...), --chat-template) or send a plain "
                "prompt to the completions endpoint instead"
            )
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            tools=tools,
            documents=documents,
            **kwargs,
        )

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Prompt ids of a chat: the rendered template, encoded without adding bos/eos again.

        Same as transformers' ``apply_chat_template(tokenize=True)``: a template that wants a bos
        writes ``{{ bos_token }}`` itself, so adding one here would double it.
        """
        return self.chat_prompt(messages, add_generation_prompt, **kwargs)[1]

    def chat_prompt(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> tuple[str, list[int]]:
        """(rendered text, prompt ids) of a chat, rendering the template once."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return text, self.encode(text, add_special_tokens=False)

    # ---- helpers ------------------------------------------------------------------------------

    def _id_of(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return self.backend.token_to_id(token) if token is not None else None

    def _stop_ids(self, extra: set[int]) -> set[int]:
        stop = {i for i in extra if 0 <= i < self.vocab_size}
        if self.eos_token_id is not None:
            stop.add(self.eos_token_id)
        for token in END_OF_TURN_TOKENS:
            token_id = self.backend.token_to_id(token)
            if token_id is not None and self.chat_template and token in self.chat_template:
                stop.add(token_id)
        return stop

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
            f"eos={self.eos_token_id}, stop={sorted(self.stop_token_ids)}, add_bos={self.add_bos})"
        )


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas; never emits a broken UTF-8 character.

    Each step decodes only a short window (vLLM's prefix/read offsets): the text of
    ``ids[prefix_offset:]`` minus the text of ``ids[prefix_offset:read_offset]`` is the delta.
    A window whose text ends in U+FFFD is an unfinished character, held back until it completes.
    The window starts on the last few prompt tokens, so a leading space of the first output token
    survives decoders that strip one at the start of a text (SentencePiece). For byte-level
    vocabularies the deltas concatenate to ``tokenizer.decode(output_ids)``.
    """

    CONTEXT_TOKENS = 5  # prompt tokens kept as decoding context

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.output_ids: list[int] = []
        self.text = ""  # all deltas so far
        # Invariant: _ids[_prefix:_read] decodes to whole characters; _ids[_read:] is pending.
        self._ids = list(prompt_ids[-self.CONTEXT_TOKENS :])
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        """Append ``token_id``; return the new text it completes (possibly "")."""
        self.output_ids.append(token_id)
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing visible yet (special token skipped, or a character unfinished)
        delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix > 64:  # drop ids no window will look at again; keeps memory O(window)
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return (
            self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""
        )


# ---- private helpers ----------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json spells a special token as "<s>" or as {"content": "<s>", ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


_ADDED_TOKEN_FLAGS = ("special", "normalized", "lstrip", "rstrip", "single_word")


def _ensure_added_tokens(
    backend: BackendTokenizer, added_tokens_decoder: dict[str, dict], special_tokens: Any
) -> None:
    """Add tokens that tokenizer_config.json declares but tokenizer.json lacks, as transformers does."""
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    for index, spec in sorted(added_tokens_decoder.items(), key=lambda kv: int(kv[0])):
        if spec["content"] in present:
            continue
        flags = {key: spec.get(key, False) for key in _ADDED_TOKEN_FLAGS}
        token = AddedToken(spec["content"], **flags)
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])
        if (got := backend.token_to_id(token.content)) != int(index):
            log.warning(
                "added token %r got id %s, not the configured %s", token.content, got, index
            )
    # Named special tokens (bos, eos, ...) are special even when neither file lists them.
    declared = present | {spec["content"] for spec in added_tokens_decoder.values()}
    missing = [token for token in special_tokens if token not in declared]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def _resolve_add_bos(
    backend: BackendTokenizer, config: dict[str, Any], special_tokens: dict[str, str]
) -> bool:
    """Whether encode() prepends bos. tokenizer.json's post-processor decides, as in transformers;
    only when it has none do tokenizer_config's add_bos_token / add_eos_token build one."""
    bos = special_tokens.get("bos_token")
    bos_id = backend.token_to_id(bos) if bos else None
    if backend.post_processor is None:
        eos = special_tokens.get("eos_token")
        eos_id = backend.token_to_id(eos) if eos and config.get("add_eos_token") else None
        add_bos_id = bos_id if config.get("add_bos_token") else None
        backend.post_processor = bos_eos_post_processor(backend, add_bos_id, eos_id)
    with_special = backend.encode("a").ids
    plain = backend.encode("a", add_special_tokens=False).ids
    return bos_id is not None and len(with_special) > len(plain) and with_special[0] == bos_id


def _read_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja, then chat_template.json, then tokenizer_config.json's entry."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
    template = template or config.get("chat_template")
    # Several named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


@cache
def _unicode_to_byte() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


def _clean_up_tokenization(text: str) -> str:
    # transformers' clean_up_tokenization (it applies it only to non-BPE models, and so do we):
    # drop the spaces around each of these, in this order.
    for spaced in (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"):
        text = text.replace(spaced, spaced.strip(" "))
    return text
