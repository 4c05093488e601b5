"""`smolvlm finetune`: flags map onto FinetuneOptions, bad combinations are refused, and a run reports what it did
(including the records it skipped, by line)."""

import argparse
import json

import pytest
from finetune_data import assistant, conversations, finetune_cli, write_jsonl

from smolvlm import InputError
from smolvlm.training import FinetuneOptions
from smolvlm.training.cli import add_finetune, options_from_args

REQUIRED = ["--model", "M", "--data", "d.jsonl", "--output", "out"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_finetune(parser.add_subparsers())
    return parser.parse_args(["finetune", *argv])


def test_flags_are_the_options():
    options = options_from_args(parse(
        *REQUIRED, "--eval", "e.jsonl", "--full", "--freeze-vision", "--steps", "7", "--lr", "3e-4", "--batch-size", "2",
        "--grad-accum", "4", "--gradient-checkpointing", "--dtype", "bfloat16", "--device", "cpu", "--seed", "5",
        "--save-every", "3", "--eval-every", "2", "--resume", "--skip-bad-records", "--no-progress",
        "--lr-schedule", "linear", "--warmup-steps", "1", "--weight-decay", "0.1", "--max-grad-norm", "0"))
    assert options == FinetuneOptions(
        model="M", data="d.jsonl", output="out", eval="e.jsonl", full=True, freeze_vision=True, steps=7, lr=3e-4,
        batch_size=2, grad_accum=4, gradient_checkpointing=True, dtype="bfloat16", device="cpu", seed=5, save_every=3,
        eval_every=2, resume=True, skip_bad_records=True, progress=False, lr_schedule="linear", warmup_steps=1,
        weight_decay=0.1, max_grad_norm=None)
    lora = options_from_args(parse(*REQUIRED, "--lora-r", "16", "--lora-alpha", "8", "--lora-dropout", "0",
                                   "--lora-targets", "text,connector", "--merge", "--epochs", "3"))
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.merge, lora.epochs) == (16, 8.0, 0.0, True, 3)
    checked = lora.checked()
    assert checked.lora_targets == ("text", "connector") and checked.lr == 2e-4  # the LoRA default


def test_defaults_are_the_dataclass_defaults():
    options = options_from_args(parse(*REQUIRED))
    assert options == FinetuneOptions(model="M", data="d.jsonl", output="out")
    checked = options.checked()
    assert (checked.full, checked.lora_r, checked.lora_alpha, checked.lr) == (False, 8, 16, 2e-4)
    assert FinetuneOptions("M", "d", "o", full=True).checked().lr == 1e-5


def test_image_splitting_flags_and_the_model_default():
    options = options_from_args(parse(*REQUIRED, "--no-image-splitting", "--image-longest-edge", "768"))
    assert (options.do_image_splitting, options.image_longest_edge) == (False, 768)
    assert options_from_args(parse("--data", "d.jsonl", "--output", "o")).model == "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"


@pytest.mark.parametrize("argv", [["--full", "--lora-r", "4"], ["--epochs", "2", "--steps", "5"], [],
                                  ["--lr-schedule", "cubic"]])
def test_conflicting_or_missing_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*(argv + REQUIRED if argv else ["--model", "M"]))
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.parametrize("change, why", [
    (dict(full=True, merge=True), "--merge applies to LoRA"),
    (dict(freeze_vision=True), "--freeze-vision applies to full fine-tuning"),
    (dict(lora_targets="text,decoder"), "'lora_targets' = 'text,decoder'"),
    (dict(batch_size=0), "'batch_size' = 0: expected a positive integer"),
    (dict(lr=-1.0), "'lr' = -1.0"),
    (dict(lora_dropout=1.5), "'lora_dropout' = 1.5"),
    (dict(warmup_steps=-1), "'warmup_steps' = -1"),
    (dict(image_longest_edge=0), "'image_longest_edge' = 0"),
])
def test_bad_options_are_named(change, why):
    with pytest.raises(InputError, match=why.replace("(", r"\(").replace(")", r"\)")):
        FinetuneOptions("M", "d.jsonl", "out", **change).checked()


def test_run_reports_and_skips_bad_records(tiny_v2, dataset, tmp_path, capsys):
    bad = [  # line 5 fails when read (missing image), line 6 only when its image is decoded
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "imgs/gone.png"}]}, assistant("x")]},
        {"messages": [{"role": "user", "content": [{"type": "image", "base64": "bm90IGFuIGltYWdl"}]}, assistant("x")]},
    ]
    data = write_jsonl(dataset.parent / "mixed.jsonl", conversations() + bad)
    argv = ["--model", str(tiny_v2), "--data", str(data), "--epochs", "2", "--batch-size", "3", "--no-progress"]
    with pytest.raises(InputError, match=r"mixed.jsonl, line 5: .*imgs/gone.png' not found"):
        finetune_cli(*argv, "--output", str(tmp_path / "a"))

    assert finetune_cli(*argv, "--output", str(tmp_path / "b"), "--skip-bad-records") == 0
    out, err = capsys.readouterr()
    assert "mixed.jsonl, line 5: " in err and "mixed.jsonl, line 6: " in err
    assert err.count("line 6: ") == 1  # reported once, though it comes up in both epochs
    assert f"wrote {tmp_path / 'b'} after 4 steps" in out and "skipped 2 bad records" in out  # 2 epochs of 2 batches
    assert len([e for e in map(json.loads, (tmp_path / "b" / "log.jsonl").read_text().splitlines())]) == 4


def test_image_options_reach_the_processor_that_reads_the_data(tiny_v2, dataset, tmp_path, monkeypatch):
    from smolvlm.training import run

    seen = []

    def read_data(path, data_format, processor, skip):
        seen.append(processor.image_processor)
        raise InputError("stop here")

    monkeypatch.setattr(run, "read_data", read_data)
    with pytest.raises(InputError, match="stop here"):
        finetune_cli("--model", str(tiny_v2), "--data", str(dataset), "--output", str(tmp_path / "o"),
                     "--no-image-splitting", "--image-longest-edge", "64")
    assert (seen[0].do_image_splitting, seen[0].size) == (False, {"longest_edge": 64})
