"""`<image>` expansion, tokenization, padding, truncation, image/prompt matching and decoding, against the reference."""

import pytest
import torch
from tokenizers import Tokenizer

from processing_reference import assert_same_inputs, photo
from smolvlm.errors import InputError
from smolvlm.processing.prompt import ImageTokens, image_prompt

SMALL = dict(size={"longest_edge": 128}, max_image_size={"longest_edge": 64})
N = 64  # image_seq_len of both checkpoints


@pytest.mark.parametrize("rows,cols", [(0, 0), (1, 1), (2, 3), (4, 4), (6, 6)])
def test_image_prompt_matches_the_reference_string(rows, cols):
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    expected = get_image_prompt_string(rows, cols, N, "<fake_token_around_image>", "<image>", "<global-img>")
    assert image_prompt(rows, cols, N, ImageTokens()) == expected


def test_split_image_token_count_and_double_newline(processors):
    ours, _ = processors["v2"]
    tokenizer = ours.tokenizer
    newline2 = tokenizer.token_to_id("Ċ" * 2)  # "\n\n" is one token
    for rows, cols in [(3, 4), (4, 4), (1, 4), (0, 0)]:
        ids = tokenizer.encode(image_prompt(rows, cols, N, ImageTokens())).ids
        expected = rows * cols * (N + 2) + rows + N + 3 if rows else N + 3
        assert len(ids) == expected
        assert ids.count(ours.image_token_id) == (rows * cols + 1) * N
        assert ids.count(newline2) == (1 if rows else 0)


def test_text_only_batches_pad_with_the_pad_token(pair):
    ours, ref = pair
    texts = ["Hello world, this is a longer prompt.", "Short."]
    for side in ("left", "right"):
        got = ours(text=texts, padding=True, padding_side=side)
        assert_same_inputs(got, ref(text=texts, padding=True, padding_side=side, return_tensors="pt"))
        assert (got["input_ids"][got["attention_mask"] == 0] == 2).all()  # <|im_end|>
    assert ours.pad_token_id == 2 and ours.image_token_id == 49190
    assert isinstance(ours.tokenizer, Tokenizer)


def test_ragged_batch_is_padded_even_without_padding(pair):
    ours, ref = pair
    texts = ["one two three four", "five"]
    got = ours(text=texts)  # the reference raises here (it can't make a tensor); we pad to the longest
    assert_same_inputs(got, ref(text=texts, padding=True, return_tensors="pt"))


@pytest.mark.parametrize(
    "kw",
    [dict(max_length=4), dict(truncation=True, max_length=5), dict(padding="max_length", max_length=12),
     dict(padding="max_length", max_length=3), dict(padding=True, truncation="longest_first", max_length=5,
                                                    padding_side="left")],
    ids=["max_length-alone-truncates", "truncation", "pad-to-max-length", "pad-to-max-length-no-truncation",
         "pad-and-truncate-left"],
)
def test_padding_and_truncation_rules(pair, kw):
    """Same rows as the reference (which returns lists here); where its rows differ in length, ours are padded."""
    ours, ref = pair
    texts = ["Hello world, this is a test of things", "short"]
    got = ours(text=texts, **kw)
    expected = ref(text=texts, **kw)
    left = kw.get("padding_side") == "left"
    width = got["input_ids"].shape[1]
    assert width == max(len(row) for row in expected["input_ids"])
    for b, (ids, mask) in enumerate(zip(expected["input_ids"], expected["attention_mask"])):
        pad = width - len(ids)
        padded_ids = [2] * pad + ids if left else ids + [2] * pad
        padded_mask = [0] * pad + mask if left else mask + [0] * pad
        assert got["input_ids"][b].tolist() == padded_ids
        assert got["attention_mask"][b].tolist() == padded_mask


def test_truncation_keeping_the_image_matches(pair):
    ours, ref = pair
    text = "word " * 40 + "<image>Describe."
    full = ours(text=text, images=photo(20, 20), do_image_splitting=False)["input_ids"].shape[1]
    kw = dict(truncation=True, max_length=full - 10, do_image_splitting=False)  # truncation_side is "left"
    got = check_call(pair, text, photo(20, 20), **kw)
    assert got["input_ids"].shape[1] == full - 10


def test_truncation_through_image_tokens_raises(pair):
    ours, ref = pair
    text = "<image>" + " word" * 40
    # v2 raises "Mismatch in `image` token count"; v1 (Idefics3Processor) fails on a None token offset instead.
    with pytest.raises((ValueError, TypeError)):
        ref(text=text, images=photo(20, 20), truncation=True, max_length=60, do_image_splitting=False)
    with pytest.raises(InputError, match=r"would cut image tokens.*\[64\].*\[\d+\]"):
        ours(text=text, images=photo(20, 20), truncation=True, max_length=60, do_image_splitting=False)


def check_call(pair, text, images, **kw):
    ours, ref = pair
    got = ours(text=text, images=images, **kw)
    assert_same_inputs(got, ref(text=text, images=images, return_tensors="pt", **kw))
    return got


def test_images_without_text(pair):
    check_call(pair, None, [photo(30, 20, 1), photo(20, 30, 2)], **SMALL)


def test_empty_image_lists_for_text_only_rows(pair):
    check_call(pair, ["No image here.", "<image>One here.", "None."], [[], [photo(30, 20)], []], padding=True,
               padding_side="left", **SMALL)


def test_one_image_with_a_single_prompt(pair):
    check_call(pair, "<image>What is it?", photo(30, 20), **SMALL)


def test_flat_image_list_for_several_prompts(processors):
    """v1 (Idefics3Processor) splits a flat list over the prompts by their <image> counts; v2 (SmolVLMProcessor)
    reads it as one prompt's images and reports the mismatch."""
    texts = ["<image>first", "second <image><image>"]
    images = [photo(30, 20, 1), photo(20, 30, 2), photo(25, 25, 3)]
    check_call(processors["v1"], texts, images, padding=True, **SMALL)
    ours, ref = processors["v2"]
    with pytest.raises(ValueError, match="per sample"):
        ref(text=texts, images=images, **SMALL)
    with pytest.raises(InputError, match=r"found \[1, 2\] <image> tokens and \[3\] images per prompt.*one list of "
                                         r"images per prompt"):
        ours(text=texts, images=images, **SMALL)


@pytest.mark.parametrize(
    "text,images,message",
    [
        ("<image>", None, r"Found \[1\] <image> tokens per prompt but no images"),
        ("no placeholder", [photo(8, 8)], r"hold 0 <image> tokens \(\[0\] per prompt\) but 1 images were passed"),
        (["<image>", "<image><image>"], [[photo(8, 8)], [photo(8, 8)]],
         r"hold 3 <image> tokens \(\[1, 2\] per prompt\) but 2 images were passed \(\[1, 1\] per prompt\)"),
        (["<image>", "x"], [[photo(8, 8)], [photo(8, 8)]],
         r"hold 1 <image> tokens \(\[1, 0\] per prompt\) but 2 images were passed \(\[1, 1\] per prompt\)"),
        (["<image>", "x"], [[], [photo(8, 8)]], r"found \[1, 0\] <image> tokens and \[0, 1\] images per prompt"),
        ("<image><image>", [photo(8, 8)], r"hold 2 <image> tokens \(\[2\] per prompt\) but 1 images"),
    ],
    ids=["no-images", "no-placeholder", "too-many-placeholders", "extra-image", "wrong-prompt", "too-few"],
)
def test_image_count_mismatches(pair, text, images, message):
    ours, ref = pair
    with pytest.raises(ValueError):
        ref(text=text, images=images)
    with pytest.raises(InputError, match=message):
        ours(text=text, images=images)


def test_bad_arguments(pair):
    ours, _ = pair
    for kw, message in [
        (dict(text=3), "text must be a string"),
        (dict(text="hi", return_tensors="np"), "return_tensors"),
        (dict(text="hi", padding="sideways"), "padding"),
        (dict(text="hi", padding_side="up"), "padding_side"),
        (dict(text="hi", max_length=0), "max_length"),
        (dict(), "Nothing to process"),
        (dict(text="<image>", images=[photo(8, 8), [photo(8, 8)]]), "mixing images and lists"),
        (dict(text="<image>", images=[[3]]), "sample 0, image 0 is a int"),
        (dict(text="<image>", images=photo(8, 8), size={"shortest_edge": 3}), "size"),
        (dict(text="<image>", images=photo(8, 8), max_image_size=512), "max_image_size"),
        (dict(text="<image>", images=photo(8, 8), do_image_splitting="yes"), "do_image_splitting"),
    ]:
        with pytest.raises(InputError, match=message):
            ours(**kw)


def test_decode_matches_the_reference(pair):
    ours, ref = pair
    ids = ours(text=["<image>Hi there\n\n", "A"], images=[[photo(8, 8)], []], padding=True, **SMALL)["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids[0], skip_special_tokens=skip) == ref.decode(ids[0], skip_special_tokens=skip)
        assert ours.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids[1].tolist(), skip_special_tokens=skip) == ref.decode(ids[1], skip_special_tokens=skip)
    assert ours.decode(ids[0], skip_special_tokens=True) == "\n\n\nHi there\n\n"  # 2 rows: "\n" + "\n\n"
    with pytest.raises(InputError, match="one sequence"):
        ours.decode(ids)


def test_image_settings_per_call(pair):
    for kw in (dict(do_resize=False), dict(size={"height": 100, "width": 60}),
               dict(max_image_size={"longest_edge": 48}), dict(do_image_splitting=False, size={"longest_edge": 96})):
        check_call(pair, "<image>", photo(150, 70, 4), **{**SMALL, **kw})
    check_call(pair, "<image>", photo(700, 300, 5), do_resize=False)  # real tiles, no first resize
