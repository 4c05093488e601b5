"""Incremental detokenization: pieces never split a character, concatenate to the full decode, hold back stops."""

import pytest
from tokenizers import Tokenizer

from smolvlm.generation.detokenizer import Detokenizer
from tiny import V2_FILES, needs_shared

pytestmark = needs_shared

TEXTS = [
    "Hello 🌍 world, 你好世界! café",
    "日本語のテキスト😀😀 and 👩‍👩‍👧 family",
    "plain ascii, nothing special\n\n- a list",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(V2_FILES / "tokenizer.json"))


def run(tok, ids, stop=()):
    d = Detokenizer(tok, stop)
    pieces = [d.add(i) for i in ids]
    pieces.append(d.finish())
    return pieces, d


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_full_decode_without_split_characters(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    pieces, _ = run(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 3  # streamed, not released in one piece at the end


def test_special_tokens_are_skipped(tok):
    ids = tok.encode("Answer: yes", add_special_tokens=False).ids + [tok.token_to_id("<end_of_utterance>")]
    pieces, _ = run(tok, ids)
    assert "".join(pieces) == "Answer: yes"


def test_an_unfinished_character_at_the_end_is_released_as_the_decode_does(tok):
    ids = tok.encode("ok 😀", add_special_tokens=False).ids[:-1]
    pieces, _ = run(tok, ids)
    assert pieces[-1].endswith("\ufffd")
    assert "".join(pieces) == tok.decode(ids) == "ok \ufffd"


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("Hello 🌍 world, 你好世界! café", ("世界",), "Hello 🌍 world, 你好"),
        ("one two three four", ("three", "two"), "one "),  # the earliest stop wins
        ("a\n\nb\n\nc", ("\n\n",), "a"),
        ("no stop here at all", ("zebra",), "no stop here at all"),
    ],
)
def test_stop_strings_cut_the_answer_before_them(tok, text, stop, expected):
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces, d = run(tok, ids, stop)
    assert "".join(pieces) == d.text == expected
    assert d.stopped == (expected != text)
    assert d.token_ids == ids  # tokens keep counting after the stop (they were generated)


def test_possible_stop_prefix_is_held_back_then_released(tok):
    stop = ("worldwide!",)
    ids = tok.encode("hello world wide web", add_special_tokens=False).ids
    d = Detokenizer(tok, stop)
    released = ""
    for i in ids:
        released += d.add(i)
        assert not released.endswith("world")  # "world" could start "worldwide!": never released as the end
    released += d.finish()
    assert released == "hello world wide web"
    assert not d.stopped
