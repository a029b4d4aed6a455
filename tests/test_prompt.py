"""Prompt text, lyrics cleaning, tokenisation caps and the token layout."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from khala_cli import prompt as P
from khala_cli.engine.tokens import TokenLayout

LLAMA_SPECIALS = (
    ["begin_of_text", "end_of_text", "reserved_special_token_0", "reserved_special_token_1",
     "finetune_right_pad_id", "reserved_special_token_2", "start_header_id", "end_header_id",
     "eom_id", "eot_id", "python_tag"]
    + [f"reserved_special_token_{i}" for i in range(3, 248)]
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """Byte-level tokenizer (256 ids) with the Llama-3.1 specials at 256..511."""
    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = {ch: i for i, ch in enumerate(sorted(vocab, key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([f"<|{name}|>" for name in LLAMA_SPECIALS])
    return tok


LYRICS = "[Verse]\nline one\nline two"


def test_vocal_tags_prompt_exact():
    spec = P.PromptSpec(mode="vocal", prompt_mode="tags", tags=("Pop", "Piano"), lyrics=LYRICS,
                        duration=2)
    expected = ("<|begin_of_text|>Pop, Piano<|eom_id|><|eom_id|><|start_header_id|>"
                "<|end_header_id|>[Verse]<|end_header_id|>line one<|end_header_id|>line two"
                "<|eom_id|><|reserved_special_token_2|><|eot_id|><|python_tag|>")
    assert P.backbone_text(spec) == expected
    assert P.superres_text(spec) == expected  # tags stay in the super-res prompt


def test_vocal_natural_prompt_exact():
    spec = P.PromptSpec(mode="vocal", prompt_mode="natural", prompt="  A sad song  ",
                        lyrics=LYRICS, duration=3)
    tail = ("<|eom_id|><|eom_id|><|start_header_id|><|end_header_id|>[Verse]<|end_header_id|>"
            "line one<|end_header_id|>line two<|eom_id|><|reserved_special_token_3|>"
            "<|eot_id|><|python_tag|>")
    assert P.backbone_text(spec) == "<|begin_of_text|>A sad song" + tail
    assert P.superres_text(spec) == "<|begin_of_text|>" + tail  # description dropped


def test_instrumental_tags_prompt_exact_ignores_lyrics():
    spec = P.PromptSpec(mode="instrumental", prompt_mode="tags", tags=("Lo-fi",), lyrics="la la",
                        duration=10)
    expected = ("<|begin_of_text|>Lo-fi<|eom_id|>Instrumental<|eom_id|>"
                "<|reserved_special_token_10|><|eot_id|><|python_tag|>")
    assert P.backbone_text(spec) == expected
    assert P.superres_text(spec) == expected


def test_instrumental_natural_prompt_exact():
    spec = P.PromptSpec(mode="instrumental", prompt_mode="natural", prompt="Dreamy lo-fi",
                        duration=1)
    assert P.backbone_text(spec) == (
        "<|begin_of_text|>Dreamy lo-fi<|eom_id|>Instrumental<|eom_id|>"
        "<|reserved_special_token_1|><|eot_id|><|python_tag|>")
    assert P.superres_text(spec) == (
        "<|begin_of_text|><|eom_id|>Instrumental<|eom_id|>"
        "<|reserved_special_token_1|><|eot_id|><|python_tag|>")


@pytest.mark.parametrize("raw, clean", [
    ("\uff28\uff45\uff4c\uff4c\uff4f\uff0c\u3000\uff37\uff4f\uff52\uff4c\uff44\uff01", "Hello, World!"),
    ("\uff11\uff12\uff13", "123"),
    ("\u3010Chorus\u3011", "[Chorus]"),
    ("\u300cquote\u300d \u300ein\u300f", "\"quote\" 'in'"),
    ("\u201csmart\u201d \u2018q\u2019", "\"smart\" 'q'"),
    ("zero\u200bwidth\ufeff", "zerowidth"),
    ("a\u2014\u2014b\u2014c\u2013d", "a-b-c-d"),
    ("wait\u2026", "wait..."),
    ("\u0421\u0430t \u0391\u0392\u0395", "\u0421at ABE"),  # capital С is not in the table
    ("  \u00a0padded\u3000 ", "padded"),
    ("it\u00e2\u0080\u0099s", "it's"),
    ("a|b^c", "a-b'c"),
    ("\uff5bbraces\uff5d", "\uff5bbraces\uff5d"),  # the reference leaves these alone
])
def test_clean_lyrics(raw, clean):
    assert P.clean_lyrics(raw) == clean


def test_encode_without_specials_and_cap_keeps_last(tokenizer):
    text = P.backbone_text(P.PromptSpec(tags=("Pop",), lyrics="x" * 50, duration=1))
    ids = P.encode(tokenizer, text, 10_000)
    assert ids[0] == tokenizer.token_to_id("<|begin_of_text|>")  # no extra BOS added
    assert ids[-1] == tokenizer.token_to_id("<|python_tag|>")
    capped = P.encode(tokenizer, text, 20)
    assert len(capped) == 20
    assert capped[:19] == ids[:19] and capped[-1] == ids[-1]


def test_prompt_ids_caps(tokenizer):
    spec = P.PromptSpec(tags=("Pop",), lyrics="la " * 3000, duration=3)
    bb, sr = P.prompt_ids(tokenizer, spec)
    assert len(bb) == P.BACKBONE_MAX_PROMPT and len(sr) == P.SUPERRES_MAX_PROMPT
    boa = tokenizer.token_to_id("<|python_tag|>")
    assert bb[-1] == boa and sr[-1] == boa


def test_layout_from_tokenizer(tokenizer):
    layout = TokenLayout.from_tokenizer(tokenizer, num_quantizers=64, codebook_size=1024)
    assert layout.audio_offset == 512
    assert layout.bos_id == 256 and layout.end_of_song_id == 257 and layout.no_use_id == 260
    assert layout.layer_range(1) == (512 + 1024, 512 + 2048)
    assert layout.backbone_vocab == 512 + 2048
    assert layout.superres_vocab == 512 + 64 * 1024
    assert layout.marker_id(2) == 509  # 128255 - L in the real vocabulary
    # the markers of every super-res layer are text ids, never audio ids
    assert all(0 <= layout.marker_id(q) < layout.audio_offset for q in range(2, 64))


def test_layout_real_numbers():
    layout = TokenLayout(audio_offset=128256, codebook_size=1024, num_quantizers=64,
                         bos_id=128000, end_of_song_id=128001, no_use_id=128004)
    assert layout.layer_range(0) == (128256, 129280)
    assert layout.layer_range(1) == (129280, 130304)
    assert layout.backbone_vocab == 130304
    assert layout.superres_vocab == 193792
    assert layout.marker_id(2) == 128253 and layout.marker_id(63) == 128192
