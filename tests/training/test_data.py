"""JSONL -> records -> examples: the processor's exact inputs, labels on the assistant's tokens only, errors by line."""

import base64
import json

import pytest
import torch
from finetune_data import assistant, conversations, user, write_jsonl
from PIL import Image

from smolvlm.errors import InputError
from smolvlm.processing import Processor
from smolvlm.training.data import IGNORE, BadRecord, collate, encode, epoch_order, micro_batch, read_jsonl
from tiny import V1_FILES, V2_FILES, needs_shared
from video_files import VideoSpec, make_video


@pytest.fixture(scope="module")
def processor(tiny_v2):
    return Processor.from_pretrained(tiny_v2)


def absolute(messages: list, folder) -> list:
    """The messages with image paths made absolute (what the processor itself is given)."""
    out = json.loads(json.dumps(messages))
    for m in out:
        for block in m["content"] if isinstance(m["content"], list) else ():
            for key in ("path", "image"):
                if block.get("type") == "image" and key in block:
                    block[key] = str(folder / block[key])
    return out


def labelled_runs(example) -> list[list[int]]:
    """The label ids of each contiguous run of labelled positions."""
    runs, current = [], []
    for label in example.labels.tolist() + [IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            runs, current = runs + [current], []
    return runs


def test_inputs_are_the_processors(processor, dataset):
    records, bad = read_jsonl(dataset, processor)
    assert bad == [] and len(records) == len(conversations())
    for record, conversation in zip(records, conversations()):
        example = encode(record, processor)
        expected = processor.apply_chat_template(absolute(conversation["messages"], dataset.parent),
                                                 add_generation_prompt=False, tokenize=True)
        assert torch.equal(example.input_ids, expected["input_ids"][0])
        if "pixel_values" in expected:
            assert torch.equal(example.pixel_values, expected["pixel_values"][0])
            assert torch.equal(example.pixel_attention_mask, expected["pixel_attention_mask"][0])
        else:
            assert example.pixel_values is None
        assert example.labels.shape == example.input_ids.shape


def test_labels_are_the_assistant_turns_only(processor, dataset):
    records, _ = read_jsonl(dataset, processor)
    expected = [[" Red."], [" Hi there", " Green and blue"], [" A red square."], [" 1 2 3"]]
    for record, answers in zip(records, expected):
        example = encode(record, processor)
        runs = labelled_runs(example)
        assert [processor.decode(run) for run in runs] == [a + "<end_of_utterance>\n" for a in answers]
        kept = example.labels != IGNORE
        assert torch.equal(example.labels[kept], example.input_ids[kept])
        assert not (example.input_ids[kept] == processor.image_token_id).any()


def test_image_in_an_assistant_turn_is_masked(processor, dataset):
    path = write_jsonl(dataset.parent / "a.jsonl", [{"messages": [
        user("Draw it"),
        {"role": "assistant", "content": [{"type": "text", "text": "Here:"}, {"type": "image", "path": "imgs/wide.png"},
                                          {"type": "text", "text": " done"}]}]}])
    (record,), _ = read_jsonl(path, processor)
    example = encode(record, processor)
    image_ids = example.input_ids == processor.image_token_id
    assert image_ids.sum() > 0 and (example.labels[image_ids] == IGNORE).all()
    assert [processor.decode(r) for r in labelled_runs(example)] == [" Here:", " done<end_of_utterance>\n"]


@needs_shared
@pytest.mark.parametrize("files", [V1_FILES, V2_FILES], ids=["v1", "v2"])
def test_real_processor_settings(files, dataset):
    """Released processors (512px tiles, 64 or 81 tokens per tile): the same inputs as the processor's."""
    processor = Processor.from_pretrained(files)
    Image.new("RGB", (900, 400), (10, 90, 160)).save(dataset.parent / "imgs/big.png")
    messages = [user("What is it?", "imgs/big.png", "imgs/red.png"), assistant("Two boxes.")]
    (record,), _ = read_jsonl(write_jsonl(dataset.parent / "big.jsonl", [{"messages": messages}]), processor)
    example = encode(record, processor)
    expected = processor.apply_chat_template(absolute(messages, dataset.parent), add_generation_prompt=False,
                                             tokenize=True)
    assert torch.equal(example.input_ids, expected["input_ids"][0])
    assert torch.equal(example.pixel_values, expected["pixel_values"][0])
    assert [processor.decode(r) for r in labelled_runs(example)] == [" Two boxes.<end_of_utterance>\n"]


def test_image_sources(processor, dataset):
    """Relative and absolute paths, the "image"/"path"/"url"/"base64" keys, data URLs and bare base64 give the same
    pixels."""
    data = (dataset.parent / "imgs/red.png").read_bytes()
    b64 = base64.b64encode(data).decode()
    sources = [{"path": "imgs/red.png"}, {"image": str(dataset.parent / "imgs/red.png")}, {"base64": b64},
               {"image": b64}, {"url": "data:image/png;base64," + b64}]
    lines = [{"messages": [{"role": "user", "content": [{"type": "image", **s}]}, assistant("Red")]} for s in sources]
    records, _ = read_jsonl(write_jsonl(dataset.parent / "s.jsonl", lines), processor)
    pixels = [encode(r, processor).pixel_values for r in records]
    assert all(torch.equal(p, pixels[0]) for p in pixels)


def bad_cases(folder):
    (folder / "imgs/not-an-image.png").write_text("hello")
    (folder / "clip.mp4").write_bytes(b"")  # only decoded when encoding
    good = conversations()[0]
    return [
        ('{"messages": [', "not valid JSON"),
        ({"conversation": []}, 'expected an object {"messages": [...]}'),
        ({"messages": [user("Hi", "imgs/missing.png"), assistant("Hello")]}, "image file 'imgs/missing.png' not found"),
        ({"messages": [user("Hi", "imgs/not-an-image.png"), assistant("Hello")]}, "is not an image Pillow can read"),
        ({"messages": [user("Hi")]}, "no assistant message"),
        ({"messages": [assistant("Hello"), user("Hi")]}, "starts with the assistant"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}, assistant("x")]},
         "an image block needs one of the keys"),
        ({"messages": [{"content": "Hi"}, assistant("x")]}, "a string 'role'"),
        ({"messages": [user("what is <image>?"), assistant("x")]}, "reserved for images"),
        ({"messages": [{"role": "user", "content": [{"type": "video", "path": "v.mp4"}]}, assistant("x")]},
         "video file 'v.mp4' not found"),
        ({"messages": [user("Hi", "imgs/red.png"), {"role": "user", "content": [{"type": "video", "path": "clip.mp4"}]},
                       assistant("x")]}, "images or videos, not both"),
    ], good


def test_bad_records_are_named_by_line(processor, dataset):
    cases, good = bad_cases(dataset.parent)
    for record, why in cases:
        path = write_jsonl(dataset.parent / "bad.jsonl", [good, good, "", record, good])
        with pytest.raises(BadRecord) as e:
            read_jsonl(path, processor)
        assert str(e.value).startswith(f"{path}, line 4: ") and why in str(e.value), str(e.value)
    path = dataset.parent / "latin1.jsonl"
    path.write_bytes(json.dumps(good).encode() + b"\n" + json.dumps(good).replace("Red", "R\u00e9d").encode("latin-1"))
    with pytest.raises(BadRecord, match=r"latin1.jsonl, line 2: not UTF-8 text"):
        read_jsonl(path, processor)


def test_skip_bad_records_counts_them(processor, dataset):
    cases, good = bad_cases(dataset.parent)
    path = write_jsonl(dataset.parent / "mixed.jsonl", [good] + [record for record, _ in cases] + [good])
    records, bad = read_jsonl(path, processor, skip_bad_records=True)
    assert len(records) == 2 and [r.source for r in records] == [f"{path}, line 1", f"{path}, line {len(cases) + 2}"]
    assert [str(e).split(":")[0] for e in bad] == [f"{path}, line {n}" for n in range(2, len(cases) + 2)]
    with pytest.raises(InputError, match=f"holds no usable records .{len(cases)} bad ones were skipped"):
        read_jsonl(write_jsonl(dataset.parent / "allbad.jsonl", [r for r, _ in cases]), processor, skip_bad_records=True)
    with pytest.raises(InputError, match="Data file .*nope.jsonl not found"):
        read_jsonl(dataset.parent / "nope.jsonl", processor)


def test_undecodable_image_fails_at_encoding_with_its_line(processor, dataset):
    lines = [conversations()[0], {"messages": [{"role": "user", "content": [{"type": "image", "base64": "bm90IGFuIGltYWdl"}]},
                                               assistant("x")]}]
    records, _ = read_jsonl(write_jsonl(dataset.parent / "b64.jsonl", lines), processor)
    with pytest.raises(BadRecord, match=r"b64.jsonl, line 2: .*image"):
        encode(records[1], processor)


def test_collate_pads_tokens_and_frames(processor, dataset):
    records, _ = read_jsonl(dataset, processor)
    examples = [encode(r, processor) for r in records]
    batch = collate(examples, processor.pad_token_id)
    lengths = [len(e.input_ids) for e in examples]
    frames = [0 if e.pixel_values is None else e.pixel_values.shape[0] for e in examples]
    assert batch["input_ids"].shape == (4, max(lengths)) and batch["pixel_values"].shape[:2] == (4, max(frames))
    for row, (e, n, f) in enumerate(zip(examples, lengths, frames)):
        assert torch.equal(batch["input_ids"][row, :n], e.input_ids) and torch.equal(batch["labels"][row, :n], e.labels)
        assert (batch["input_ids"][row, n:] == processor.pad_token_id).all() and (batch["labels"][row, n:] == IGNORE).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["pixel_values"][row, f:] == 0).all() and (batch["pixel_attention_mask"][row, f:] == 0).all()
        assert batch["pixel_attention_mask"][row, :f].bool().all()
    text_only = collate([examples[3]], processor.pad_token_id)
    assert text_only["pixel_values"] is None and text_only["pixel_attention_mask"] is None


def test_data_order_is_a_function_of_seed_and_epoch():
    assert epoch_order(10, 3, 1).tolist() == epoch_order(10, 3, 1).tolist()
    assert epoch_order(10, 3, 1).tolist() != epoch_order(10, 3, 2).tolist()
    assert epoch_order(10, 3, 1).tolist() != epoch_order(10, 4, 1).tolist()
    # 10 records in batches of 4: micro-batches 0-2 are epoch 0 (the last one short), 3-5 epoch 1.
    for epoch in range(2):
        batches = [micro_batch(10, 4, 3, 3 * epoch + k) for k in range(3)]
        assert [len(b) for b in batches] == [4, 4, 2]
        assert sum(batches, []) == epoch_order(10, 3, epoch).tolist()


def test_videos(processor, dataset):
    """SmolVLM2 video conversations: the processor's frames and video prompt, labels on the answer only."""
    make_video(dataset.parent / "clip.mp4", VideoSpec(32, 24, 4, 12))
    make_video(dataset.parent / "long.mp4", VideoSpec(24, 32, 2, 14))
    messages = [{"role": "user", "content": [{"type": "video", "path": "clip.mp4"}, {"type": "text", "text": "And"},
                                             {"type": "video", "video": str(dataset.parent / "long.mp4")}]},
                assistant("Two clips.")]
    (record,), _ = read_jsonl(write_jsonl(dataset.parent / "v.jsonl", [{"messages": messages}]), processor)
    example = encode(record, processor)
    expected = processor.apply_chat_template(
        [{"role": m["role"], "content": [{**b, "path": str(dataset.parent / b["path"])} if "path" in b else b
                                         for b in m["content"]]} for m in messages],
        add_generation_prompt=False, tokenize=True)
    assert torch.equal(example.input_ids, expected["input_ids"][0])
    assert torch.equal(example.pixel_values, expected["pixel_values"][0]) and example.pixel_values.shape[0] == 3 + 7
    assert [processor.decode(r) for r in labelled_runs(example)] == [" Two clips.<end_of_utterance>\n"]


def test_videos_need_smolvlm2(tiny_v1, dataset):
    make_video(dataset.parent / "clip.mp4", VideoSpec(32, 24, 4, 12))
    line = {"messages": [{"role": "user", "content": [{"type": "video", "path": "clip.mp4"}]}, assistant("x")]}
    with pytest.raises(BadRecord, match="line 1: videos need a SmolVLM2 checkpoint"):
        read_jsonl(write_jsonl(dataset.parent / "v.jsonl", [line]), Processor.from_pretrained(tiny_v1))
