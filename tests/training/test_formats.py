"""Their data formats: ShareGPT/LLaVA files and `datasets` tables read into the same records as our JSONL, detected
with a message saying so, and their errors named by file and record."""

import json

import datasets
import pytest
from finetune_data import write_jsonl
from PIL import Image

from smolvlm import InputError
from smolvlm.processing import Processor
from smolvlm.training.data import encode, read_jsonl
from smolvlm.training.formats import read_data


@pytest.fixture(scope="module")
def processor(tiny_v2):
    return Processor.from_pretrained(tiny_v2)


def ours(dataset, processor):
    return read_jsonl(dataset, processor)[0][:2]  # the first two records of conftest's `conversations()`


SHAREGPT = [
    {"id": "a", "image": "imgs/red.png",
     "conversations": [{"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": "Red."}]},
    {"images": ["imgs/wide.png", "imgs/tall.png"],
     "conversations": [{"from": "system", "value": "Answer in one word."}, {"from": "human", "value": "Hello"},
                       {"from": "gpt", "value": "Hi there"},
                       {"from": "human", "value": "<image><image>\nAnd these two?"},
                       {"from": "gpt", "value": "Green and blue"}]},
]


def same(a, b):
    assert [(r.text, r.spans, r.images) for r in a] == [(r.text, r.spans, r.images) for r in b]


def test_sharegpt_jsonl_and_llava_json_array_read_as_ours(dataset, processor, capsys):
    expected = ours(dataset, processor)
    records, _ = read_data(str(write_jsonl(dataset.parent / "sg.jsonl", SHAREGPT)), "auto", processor, False)
    same(records, expected)
    assert "as sharegpt data (detected; --data-format to choose)" in capsys.readouterr().err
    (dataset.parent / "llava.json").write_text(json.dumps(SHAREGPT, indent=1))  # LLaVA: one JSON array
    same(read_data(str(dataset.parent / "llava.json"), "sharegpt", processor, False)[0], expected)
    # LLaVA without a marker: the image opens the first human turn.
    unmarked = [{**SHAREGPT[0], "conversations": [{"from": "human", "value": "What colour is this?"},
                                                  {"from": "gpt", "value": "Red."}]}]
    same(read_data(str(write_jsonl(dataset.parent / "u.jsonl", unmarked)), "sharegpt", processor, False)[0],
         expected[:1])


@pytest.mark.parametrize("record, message", [
    ({**SHAREGPT[0], "image": "imgs/nope.png"}, r"sg.jsonl, line 1: message 0, item 0: image file 'imgs/nope.png' not"),
    ({"image": "imgs/red.png", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt",
                                                                                               "value": "x"}]},
     "sg.jsonl, line 1: the conversation holds 2 <image> markers for 1 images"),
    ({"conversations": [{"from": "robot", "value": "hi"}]}, r'conversations\[0\]: expected \{"from": "human"'),
    ({"conversations": "hi"}, r'expected a ShareGPT object \{"conversations": \[...\]'),
])
def test_bad_sharegpt_records_are_named(dataset, processor, record, message):
    with pytest.raises(InputError, match=message):
        read_data(str(write_jsonl(dataset.parent / "sg.jsonl", [record])), "sharegpt", processor, False)


def test_format_errors_say_what_to_pass(dataset, processor):
    with pytest.raises(InputError, match=r"a ShareGPT/LLaVA record: pass --data-format sharegpt"):
        read_data(str(write_jsonl(dataset.parent / "sg.jsonl", SHAREGPT)), "messages", processor, False)
    with pytest.raises(InputError, match=r"line 1: can't tell the data format .*pass --data-format"):
        read_data(str(write_jsonl(dataset.parent / "x.jsonl", [{"text": "hi"}])), "auto", processor, False)
    with pytest.raises(InputError, match=r"is a folder; --data-format messages reads a file"):
        read_data(str(dataset.parent), "messages", processor, False)
    with pytest.raises(InputError, match=r"not found"):
        read_data(str(dataset.parent / "nope.parquet"), "auto", processor, False)


def test_datasets_folder_and_parquet_rows(dataset, processor):
    expected = ours(dataset, processor)
    images = [Image.open(dataset.parent / "imgs" / n).convert("RGB") for n in ("red.png", "wide.png", "tall.png")]
    # ShareGPT columns with PIL images, saved with save_to_disk (a DatasetDict: its train split is read).
    table = datasets.Dataset.from_dict({"conversations": [r["conversations"] for r in SHAREGPT],
                                        "images": [images[:1], images[1:]]})
    datasets.DatasetDict({"train": table}).save_to_disk(str(dataset.parent / "saved"))
    records, bad = read_data(str(dataset.parent / "saved"), "auto", processor, False)
    assert len(records) == 2 and not bad
    for got, want in zip(records, expected):  # images are the decoded pixels instead of paths
        assert (got.text, got.spans, len(got.images)) == (want.text, want.spans, len(want.images))
        assert all(isinstance(i, Image.Image) for i in got.images)
    assert [encode(r, processor).input_ids.tolist() for r in records] == \
        [encode(r, processor).input_ids.tolist() for r in expected]

    # A bad row is found when its batch reads it, and named by its row.
    datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}]], "images": [[]]}).to_parquet(
        str(dataset.parent / "bad.parquet"))
    records, _ = read_data(str(dataset.parent / "bad.parquet"), "datasets", processor, False)
    with pytest.raises(InputError, match=r"bad.parquet, row 0: no assistant message"):
        records[0]
    datasets.Dataset.from_dict({"prompt": ["hi"]}).to_parquet(str(dataset.parent / "cols.parquet"))
    with pytest.raises(InputError, match=r"expected a 'messages' .* or 'conversations' .* column, found prompt"):
        read_data(str(dataset.parent / "cols.parquet"), "auto", processor, False)
