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


def brute_force(pieces, stop):
    """(cut, held) after each piece, by re-reading the whole text: where the first completed stop string starts
    (None until one does), and the longest end of the text that begins a stop string."""
    text, out = "", []
    for piece in pieces:
        base, text = len(text), text + piece
        ends = [(e, max(len(s) for s in stop if text[:e].endswith(s))) for e in range(base + 1, len(text) + 1)
                if any(text[:e].endswith(s) for s in stop)]
        if ends:
            return out + [(ends[0][0] - ends[0][1] - base, None)]
        held = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        out.append((None, held))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_stop_matcher_finds_what_rereading_the_text_finds(seed):
    import random

    from smolvlm.generation.detokenizer import StopMatcher

    rng = random.Random(seed)
    stop = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4)))
    pieces = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 4))) for _ in range(30)]
    matcher, got = StopMatcher(stop), []
    for piece in pieces:
        cut = matcher.feed(piece)
        got.append((cut, None if cut is not None else matcher.held))
        if cut is not None:
            break
    assert got == brute_force(pieces, stop)


def test_long_stop_strings_spanning_many_pieces_are_held_back_then_cut():
    from smolvlm.generation.detokenizer import StopMatcher

    stop = tuple("a" * 255 + chr(ord("b") + i) for i in range(16))
    matcher = StopMatcher(stop)
    for _ in range(200):
        assert matcher.feed("aaaa") is None
    assert matcher.held == 255
    assert matcher.feed("b") == -255  # the first stop string started 255 characters before this piece
