"""Tokenizer: ids, decoding and chat rendering match transformers on the same files."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from tierserve.model.chat_template import ChatTemplateError
from tierserve.model.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "",
    "Hello, World! It's a test... isn't it? Yes, they're fine.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\nprint(fib(10))\n",
    "a  b   c    d\t\te\n\n\nf \n \t g   ",
    "    leading and trailing    ",
    "Pi is 3.14159265358979 and 2**64 = 18446744073709551616; 1,000,000.00 or 007",
    "Crème brûlée, naïve façade, São Paulo, Ångström, Œuvre, ﬁ ligature",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "👋🏽 family: 👨\u200d👩\u200d👧\u200d👦 flags 🇯🇵🇫🇷 😀!",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start| almost special <|im_end|><|endoftext|><file_sep>x",
    "tab\there\r\nwindows\u00a0nbsp\u200bzero-width \x00 nul",
]
CHATS = {
    "single_user": [{"role": "user", "content": "What is 2 + 2?"}],
    "system_user_assistant_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi! 👋"},
        {"role": "assistant", "content": "Hello. 日本語?"},
        {"role": "user", "content": "Tell me a joke\nabout  spaces."},
    ],
}


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_path):
    """The reference: transformers' tokenizer built from the same GGUF."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return Tokenizer.from_gguf(smollm2_path)


# ---- GGUF (SmolLM2: byte-level BPE, pre-tokenizer "smollm") ------------------------------------


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tokenizer, hf_tokenizer, text, add_special_tokens):
    expected = hf_tokenizer.encode(text, add_special_tokens=add_special_tokens)
    assert tokenizer.encode(text, add_special_tokens=add_special_tokens) == expected


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(tokenizer, hf_tokenizer, text):
    ids = hf_tokenizer.encode(text)
    for skip in (True, False):
        expected = hf_tokenizer.decode(ids, skip_special_tokens=skip)
        assert tokenizer.decode(ids, skip_special_tokens=skip) == expected
    # Text without special tokens round-trips exactly.
    if "<|" not in text:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_of_random_ids_matches_transformers(tokenizer, hf_tokenizer):
    # Random ids cut characters in half and mix in special tokens: U+FFFD and skipping must agree.
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 12))]
        ids.append(rng.randrange(17))  # one of the 17 special tokens
        for skip in (True, False):
            assert tokenizer.decode(ids, skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


def test_special_tokens_and_flags_match_the_checkpoint(tokenizer, hf_tokenizer):
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(tokenizer, name) == getattr(hf_tokenizer, name), name
    assert tokenizer.eos_token_id == tokenizer.token_to_id("<|im_end|>") == 2
    assert tokenizer.stop_token_ids == {2}
    assert tokenizer.add_bos is False  # tokenizer.ggml.add_bos_token = false
    assert tokenizer.chat_template == hf_tokenizer.chat_template


def test_token_to_bytes_concatenates_to_the_utf8_text(tokenizer):
    text = "naïve 👋🏽 日本語\n\tx"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # some tokens are pieces of one character
    assert b"".join(tokenizer.token_to_bytes(i) for i in ids) == text.encode()
    assert tokenizer.token_to_bytes(2) == b"<|im_end|>"


def test_stop_ids_include_end_of_turn_tokens_the_template_writes(tokenizer):
    template = "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"
    other = Tokenizer(
        tokenizer.backend,
        special_tokens=tokenizer.special_tokens,
        add_bos=False,
        chat_template=template,
    )
    assert other.stop_token_ids == {0, 2}  # <|endoftext|> plus eos


# ---- chat template -----------------------------------------------------------------------------


@pytest.mark.parametrize("chat", CHATS.values(), ids=CHATS.keys())
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, chat, add_generation_prompt):
    expected = hf_tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert (
        tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected
    )
    expected_ids = hf_tokenizer.apply_chat_template(
        chat, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert tokenizer.encode_chat(chat, add_generation_prompt=add_generation_prompt) == expected_ids


def test_encode_chat_adds_no_second_bos(tokenizer):
    # SmolLM2's template writes <|im_start|> (its bos) itself; the ids start with exactly one.
    ids = tokenizer.encode_chat(CHATS["single_user"])
    assert ids[0] == tokenizer.bos_token_id == 1 and ids[1] != 1
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_text_content_parts_are_joined_for_a_text_only_template(tokenizer, hf_tokenizer):
    text_parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    parts = [{"role": "user", "content": text_parts}]
    expected = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi\nthere"}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.apply_chat_template(parts) == expected
    # A template that loops over content parts itself gets the list untouched, as in transformers.
    looping = (
        "{% for m in messages %}{% for p in m['content'] %}[{{ p.text }}]{% endfor %}{% endfor %}"
    )
    assert tokenizer.apply_chat_template(parts, chat_template=looping) == "[Hi][there]"
    with pytest.raises(ChatTemplateError, match="image_url"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]
        )


def test_template_helpers_render_like_transformers(tokenizer, hf_tokenizer):
    # tojson without HTML escaping, namespace, loop controls, {% generation %}, bos/eos variables.
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% generation %}{{ m | tojson }}{% endgeneration %}\n{% endfor %}"
        "{{ ns.n }} {{ bos_token }}{{ eos_token }} {{ dict(a=1) | tojson }} {{ extra }}"
    )
    chat = [
        {"role": "user", "content": "<b>&'\"é"},
        {"role": "assistant", "content": None},
        {"role": "user"},
    ]
    expected = hf_tokenizer.apply_chat_template(
        chat, chat_template=template, tokenize=False, extra="kw"
    )
    got = tokenizer.apply_chat_template(
        chat, add_generation_prompt=False, chat_template=template, extra="kw"
    )
    assert got == expected and '"<b>&' in got


def test_raise_exception_in_template_is_a_chat_template_error(tokenizer):
    template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tokenizer.apply_chat_template(CHATS["single_user"], chat_template=template)


def test_missing_chat_template_error_names_the_fix(tokenizer):
    bare = Tokenizer(
        tokenizer.backend,
        special_tokens=tokenizer.special_tokens,
        add_bos=False,
        chat_template=None,
        source="bare.gguf",
    )
    with pytest.raises(
        ChatTemplateError, match=r"bare.gguf has no chat template.*chat_template="
    ) as info:
        bare.encode_chat(CHATS["single_user"])
    assert "completions" in str(info.value)
    assert (
        bare.apply_chat_template(CHATS["single_user"], chat_template="{{ messages[0]['content'] }}")
        == "What is 2 + 2?"
    )


def test_empty_conversation_is_rejected(tokenizer):
    with pytest.raises(ChatTemplateError, match="at least one message"):
        tokenizer.apply_chat_template([])


# ---- HF folder ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_dir(hf_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    hf_tokenizer.save_pretrained(folder)
    return folder


def test_pretrained_dir_matches_transformers(saved_dir, hf_tokenizer):
    folder_tokenizer = Tokenizer.from_pretrained_dir(saved_dir)
    for text in TEXTS:
        for special in (True, False):
            assert folder_tokenizer.encode(text, special) == hf_tokenizer.encode(
                text, add_special_tokens=special
            )
    for chat in CHATS.values():
        expected = hf_tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )
        assert folder_tokenizer.apply_chat_template(chat) == expected
    assert (folder_tokenizer.bos_token_id, folder_tokenizer.eos_token_id) == (1, 2)
    assert folder_tokenizer.add_bos is False and folder_tokenizer.vocab_size == 49152


def test_pretrained_dir_reads_generation_config_eos_ids(saved_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((saved_dir / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert Tokenizer.from_pretrained_dir(tmp_path).stop_token_ids == {0, 2}


def test_from_path_dispatches_on_file_and_folder(smollm2_path, saved_dir, tmp_path):
    assert Tokenizer.from_path(smollm2_path).source == str(smollm2_path)
    assert Tokenizer.from_path(saved_dir).source == str(saved_dir)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_path(tmp_path)


# ---- incremental detokenizer ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        " Hello 👋🏽 wörld! 日本語のテキスト 🇯🇵 ok",
        "👨\u200d👩\u200d👧\u200d👦👨\u200d👩\u200d👧\u200d👦 中文文本，还有한국어",
        "\n\n  code:\n\tx = '€'  # 💶\n",
    ],
)
def test_incremental_deltas_concatenate_to_full_decode(tokenizer, text):
    prompt = tokenizer.encode_chat(CHATS["single_user"])
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == detok.text == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas[:-1]  # some character spans several tokens and was held back


def test_incremental_keeps_special_tokens_when_asked(tokenizer):
    ids = tokenizer.encode(" hi<|im_end|>")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[], skip_special_tokens=False)
    assert [detok.add(i) for i in ids] == [" hi", "<|im_end|>"]


def test_runtime_does_not_import_transformers():
    code = "import sys, tierserve.model.tokenizer; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---- GGUF metadata, on toy byte-level vocabularies ----------------------------------------------


def _toy_byte_level(pre: str, added: dict[str, int] | None = None) -> dict:
    """256 byte tokens, merges 1+2 -> 12 -> 123, then ``added`` tokens (text -> token type)."""
    from tierserve.model.tokenizer_gguf import bytes_to_unicode

    added = added or {}
    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["12", "123", *added]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["1 2", "12 3"],
        "tokenizer.ggml.token_type": [1] * 258 + list(added.values()),
        "tokenizer.ggml.eos_token_id": len(tokens) - 1 if added else None,
    }


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("smollm", ["3", "1", "2", "3"]),  # every digit alone
        ("llama-bpe", ["3", "12", "3"]),  # digits in groups of three: "312", "3"
        ("default", ["3", "123"]),  # GPT-2: "3123" is one word
    ],
)
def test_gguf_pre_tokenizer_follows_tokenizer_ggml_pre(pre, pieces):
    toy = Tokenizer.from_gguf_metadata(_toy_byte_level(pre))
    assert [toy.id_to_token(i) for i in toy.encode("3123")] == pieces


def test_gguf_added_tokens_spelled_outside_the_byte_alphabet_stay_whole():
    eos, think = "<\uff5cend\u2581of\u2581sentence\uff5c>", "<th ink>"
    toy = Tokenizer.from_gguf_metadata(_toy_byte_level("default", {think: 4, eos: 3}))
    ids = toy.encode(f"a{think}1{eos}")
    assert ids == [ord("a"), 258, ord("1"), 259] and toy.eos_token_id == 259  # byte b has id b
    assert toy.vocab_size == 260 and toy.stop_token_ids == {259}
    assert toy.decode(ids) == f"a{think}1"
    assert toy.decode(ids, skip_special_tokens=False) == f"a{think}1{eos}"


def test_gguf_without_a_supported_tokenizer_names_the_fix():
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_gguf_metadata(
            {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}
        )
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"})


# ---- GGUF SentencePiece ("llama" tokenizer model), on a small synthetic file ---------------------


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """A llama-type GGUF: <unk> <s> </s>, 256 byte tokens, a user-defined token, scored pieces."""
    import gguf
    import numpy as np
    from tokenizers import SentencePieceBPETokenizer

    corpus = [
        "Hello world, this is a tiny corpus.",
        "The quick brown fox jumps over the lazy dog.",
        "def main():\n    return 42\n",
        "Héllo wörld café naïve",
    ] * 20
    trainer = SentencePieceBPETokenizer(add_prefix_space=True)
    trainer.train_from_iterator(corpus, vocab_size=300, min_frequency=2, show_progress=False)
    ranked = sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])
    pieces = [piece for piece, _ in ranked if piece != "<unk>"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "<|user|>", *pieces]
    types = [2, 3, 3, *[6] * 256, 4, *[1] * len(pieces)]
    scores = [0.0] * 260 + [-float(rank) for rank in range(len(pieces))]  # earlier merge, higher
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(
        "{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sentencepiece_gguf_matches_transformers(spm_gguf):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(spm_gguf.parent, gguf_file=spm_gguf.name)
    ours = Tokenizer.from_gguf(spm_gguf)
    assert ours.add_bos is True and ours.bos_token_id == 1  # llama.cpp default for SPM files
    texts = [
        "Hello world",
        " Hello  world",
        "the lazy fox 42 日本 😀",
        "<s>hi</s><|user|>x",
        "naïve\n\ttab",
        "",
    ]
    for text in texts:
        for special in (True, False):
            ids = ours.encode(text, special)
            assert ids == hf.encode(text, add_special_tokens=special)
            assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    chat = [{"role": "user", "content": "hi there"}]
    assert ours.encode_chat(chat) == hf.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert ours.encode_chat(chat).count(1) == 1  # the template's bos only


def test_sentencepiece_streaming_keeps_the_leading_space(spm_gguf):
    spm = Tokenizer.from_gguf(spm_gguf)
    prompt = spm.encode("Hello")
    output = spm.encode(" world 日本", add_special_tokens=False)
    detok = IncrementalDetokenizer(spm, prompt)
    deltas = [detok.add(i) for i in output]
    # SPM decoders strip a text's first space; with the prompt as context the delta keeps it.
    assert (
        "".join(deltas) == spm.decode(prompt + output)[len(spm.decode(prompt)) :] == " world 日本"
    )
    assert not any("\ufffd" in d for d in deltas)
    assert b"".join(spm.token_to_bytes(i) for i in output) == " world 日本".encode()
