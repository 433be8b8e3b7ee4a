"""Build a `tokenizers.Tokenizer` from the tokenizer metadata of a GGUF file (llama.cpp key names).

A GGUF has no tokenizer.json: it stores the vocabulary, merges or scores, token types and special
ids under ``tokenizer.ggml.*``. We rebuild the pipeline the original checkpoint used, following
what transformers does for GGUF files (so ids match ``AutoTokenizer.from_pretrained(gguf_file=)``)
and llama.cpp where transformers has no opinion:

    tokenizer.ggml.model  "gpt2"  -> byte-level BPE; the split regex picked by tokenizer.ggml.pre
                          "llama" -> SentencePiece-style BPE with byte fallback (merges from the
                                     file, or derived from the token scores)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

log = logging.getLogger(__name__)


class TokenType(IntEnum):
    """llama.cpp's ``tokenizer.ggml.token_type`` values."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass(slots=True)
class GGUFTokenizerParts:
    """Everything a GGUF says about its tokenizer, with the backend already built."""

    backend: BackendTokenizer
    special_tokens: dict[str, str]  # {"bos_token": "<s>", ...}, spelled as in the vocabulary
    add_bos: bool
    chat_template: str | None
    extra_stop_ids: set[int] = field(default_factory=set)  # eot / eom ids, when the file names them


# Split regexes by tokenizer.ggml.pre; names missing here get GPT-2's own regex (ByteLevel's).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 dbrx smaug-bpe".split(),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O_SPLIT),
}
# These split every digit on its own before GPT-2's regex (llama.cpp does; so do their
# tokenizer.json files, as a Digits pre-tokenizer). SmolLM2's vocabulary has no multi-digit
# token, so for it this matches transformers' GGUF loader (plain ByteLevel) id for id.
_DIGIT_SPLIT_PRES = frozenset(
    ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
)
_BYTE_LEVEL_DEFAULT_PRES = frozenset(("default", "gpt-2", "gpt2", "olmo", "jais", "stablelm2"))

# Special token names (as chat templates know them) -> the GGUF key holding the id.
_SPECIAL_ID_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
_EXTRA_STOP_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def build_gguf_tokenizer(metadata: dict[str, Any]) -> GGUFTokenizerParts:
    """Build the tokenizer that a GGUF file's ``tokenizer.*`` metadata describes.

    Raises ``ValueError`` naming the fix when the file has no vocabulary or an unsupported model.
    """
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ValueError(
            "this GGUF file has no tokenizer (no tokenizer.ggml.model / tokens); pass a folder "
            "with tokenizer.json instead (--tokenizer)"
        )
    token_types = metadata.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    ids = {name: _optional_id(metadata, key, len(tokens)) for name, key in _SPECIAL_ID_KEYS.items()}
    if kind == "gpt2":
        backend = _byte_level_bpe(metadata, tokens, token_types)
        add_bos_default = False
    elif kind == "llama":
        architecture = metadata.get("general.architecture", "llama")
        backend = _sentencepiece_bpe(metadata, tokens, architecture, ids["unk_token"])
        add_bos_default = True  # llama.cpp adds BOS to SPM vocabularies unless told otherwise
    else:
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama'); pass a "
            "folder with tokenizer.json instead (--tokenizer)"
        )
    _add_special_tokens(backend, token_types, named_ids=ids)
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    backend.post_processor = bos_eos_post_processor(
        backend, ids["bos_token"] if add_bos else None, ids["eos_token"] if add_eos else None
    )
    extra_stop = {_optional_id(metadata, key, len(tokens)) for key in _EXTRA_STOP_KEYS}
    return GGUFTokenizerParts(
        backend=backend,
        special_tokens={name: backend.id_to_token(i) for name, i in ids.items() if i is not None},
        add_bos=add_bos and ids["bos_token"] is not None,
        chat_template=metadata.get("tokenizer.chat_template"),
        extra_stop_ids={i for i in extra_stop if i is not None},
    )


def bos_eos_post_processor(
    backend: BackendTokenizer, bos_id: int | None, eos_id: int | None
) -> processors.TemplateProcessing:
    """``[bos] $A [eos]`` as transformers' ``update_post_processor`` writes it; None = not added."""
    bos = backend.id_to_token(bos_id) if bos_id is not None else None
    eos = backend.id_to_token(eos_id) if eos_id is not None else None
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    special = [(tok, i) for tok, i in ((bos, bos_id), (eos, eos_id)) if tok is not None]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, under which byte-level vocabularies are spelled."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _optional_id(metadata: dict[str, Any], key: str, vocab_size: int) -> int | None:
    value = metadata.get(key)
    return int(value) if value is not None and 0 <= int(value) < vocab_size else None


def _byte_level_bpe(
    metadata: dict[str, Any], tokens: list[str], token_types: list[int]
) -> BackendTokenizer:
    # Vocabulary tokens are spelled in GPT-2's byte alphabet; respell any a converter left in
    # plain UTF-8. Added tokens (CONTROL / USER_DEFINED) stay as written: llama.cpp's converter
    # stores them raw (DeepSeek's "<｜end▁of▁sentence｜>"), and they are matched whole as added
    # tokens. NOTE: transformers instead drops such "mislabelled" control tokens.
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    added_types = (TokenType.CONTROL, TokenType.USER_DEFINED)
    tokens = [
        t if set(t) <= alphabet or kind in added_types else "".join(spelling[b] for b in t.encode())
        for t, kind in zip(tokens, token_types, strict=True)
    ]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    bpe = models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", fuse_unk=False)
    backend = BackendTokenizer(bpe)
    backend.pre_tokenizer = _byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _PRE_SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre not in _BYTE_LEVEL_DEFAULT_PRES:
        log.warning("GGUF pre-tokenizer %r is unknown; using GPT-2's split regex", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _sentencepiece_bpe(
    metadata: dict[str, Any], tokens: list[str], architecture: str, unk_id: int | None
) -> BackendTokenizer:
    gemma = architecture.startswith("gemma")
    if gemma:
        # Gemma files store runs of spaces as real spaces; the pipeline looks them up as "▁▁".
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in metadata:
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    else:
        # Gemma's scores do not follow its merge order; its file order does.
        scores = range(0, -len(tokens), -1) if gemma else metadata.get("tokenizer.ggml.scores")
        if scores is None:
            raise ValueError("this SentencePiece GGUF has neither merges nor scores; re-convert it")
        merges = merges_from_scores(vocab, dict(zip(tokens, scores, strict=True)))
    unk = tokens[unk_id] if unk_id is not None else None
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = BackendTokenizer(bpe)
    spm_decoders = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:  # spaces become "▁" up front, and no space is prepended
        backend.normalizer = normalizers.Replace(" ", "\u2581")
    elif architecture == "phi3":  # prefix space from a normalizer, so "  hi" -> "▁▁▁hi"
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        spm_decoders.append(decoders.Strip(content=" ", left=1, right=0))
    else:
        add_space = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if add_space else "never", split=False
        )
        if add_space:
            spm_decoders.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(spm_decoders)
    return backend


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a scored vocabulary: every split of a token into two known tokens,
    best score first (transformers' ``generate_merges``, so ids match it)."""
    found = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _add_special_tokens(
    backend: BackendTokenizer, token_types: list[int], named_ids: dict[str, int | None]
) -> None:
    """CONTROL tokens (and bos/eos/unk/pad) become special added tokens, USER_DEFINED ones plain
    added tokens, so both are matched whole in text instead of being cut into pieces."""
    named = {i for i in named_ids.values() if i is not None}
    special = [i for i, kind in enumerate(token_types) if kind == TokenType.CONTROL or i in named]
    user = [
        i for i, kind in enumerate(token_types) if kind == TokenType.USER_DEFINED and i not in named
    ]
    # Spelled as in the backend's vocabulary, so every added token keeps its own id.
    spell = backend.id_to_token
    backend.add_special_tokens(
        [AddedToken(spell(i), normalized=False, special=True) for i in special]
    )
    backend.add_tokens([AddedToken(spell(i), normalized=False, special=False) for i in user])
