"""A run killed mid-training (SIGKILL, in a subprocess) and resumed with --resume ends with exactly the weights, losses
and eval losses of the same run never interrupted."""

import csv
import json
import subprocess
import sys
import time

import pytest
import torch
from finetune_data import finetune_cli
from safetensors.torch import load_file

from smolvlm import InputError

# `smolvlm finetune` as its own program (smolvlm/cli.py registers the same parser), on one thread like the tests.
PROGRAM = ("import argparse, sys, torch; torch.set_num_threads(1); from smolvlm.training.cli import add_finetune; "
           "p = argparse.ArgumentParser(); add_finetune(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); "
           "sys.exit(a.run(a))")


def history(output) -> list[dict]:
    """The log without the timing."""
    entries = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in entries]


def kill_after_checkpoint(argv: list[str], output, step: int) -> None:
    """Start the run and SIGKILL it as soon as the checkpoint of `step` exists."""
    process = subprocess.Popen([sys.executable, "-c", PROGRAM, "finetune", *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (output / "checkpoints" / f"step-{step}").is_dir():
        assert process.poll() is None, f"the run ended before its checkpoint: {process.stderr.read().decode()}"
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.005)
    process.kill()
    assert process.wait() == -9  # killed mid-run, not finished
    process.stderr.close()


@pytest.mark.parametrize("kind", ["lora", "qlora", "full"])
def test_resume_after_kill_equals_uninterrupted(kind, tiny_v2, dataset, tmp_path):
    # 4 records in micro-batches of 3 (the second one short), 2 per step: every step is a new epoch, reshuffled.
    argv = ["--model", str(tiny_v2), "--data", str(dataset), "--eval", str(dataset), "--steps", "30",
            "--batch-size", "3", "--grad-accum", "2", "--save-every", "4", "--eval-every", "5", "--seed", "7",
            "--lr", "1e-3", "--warmup-steps", "3", "--no-progress"]
    argv += ["--full"] if kind == "full" else ["--lora-r", "4", "--lora-dropout", "0.2", "--lora-targets", "text,vision"]
    argv += ["--qlora", "--report-to", "jsonl,csv,tensorboard"] if kind == "qlora" else []
    weights = "model.safetensors" if kind == "full" else "adapter_model.safetensors"

    assert finetune_cli(*argv, "--output", str(tmp_path / "straight")) == 0
    expected = load_file(tmp_path / "straight" / weights)

    out = tmp_path / "killed"
    kill_after_checkpoint(argv + ["--output", str(out)], out, step=4)
    assert not (out / weights).exists()
    with pytest.raises(InputError, match="holds an unfinished run .checkpoint step-4.: pass --resume"):
        finetune_cli(*argv, "--output", str(out))
    changed = [a if a != "1e-3" else "2e-3" for a in argv]
    with pytest.raises(InputError, match=r"the run used different lr \(0.001, now 0.002\)"):
        finetune_cli(*changed, "--output", str(out), "--resume")

    assert finetune_cli(*argv, "--output", str(out), "--resume") == 0
    resumed = load_file(out / weights)
    assert sorted(resumed) == sorted(expected)
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    assert history(out) == history(tmp_path / "straight")
    assert not (out / "checkpoints").exists()
    if kind == "qlora":  # the other reporters also end as the uninterrupted run's, and so does the loss curve's data
        rows = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in csv.DictReader((out / "log.csv").open())]
        assert rows == [{k: v for k, v in r.items() if k != "tokens_per_s"}
                        for r in csv.DictReader((tmp_path / "straight" / "log.csv").open())]
        assert [e for e in tensorboard_scalars(out) if e[0] != "train/tokens_per_s"] == \
            [e for e in tensorboard_scalars(tmp_path / "straight") if e[0] != "train/tokens_per_s"]
        assert "![loss curve](loss.png)" in (out / "summary.md").read_text()


def tensorboard_scalars(output) -> list[tuple[str, int, float]]:
    """(tag, step, value) of the scalars TensorBoard shows for the run (events a resume purged are left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tb"))
    events.Reload()
    return sorted((tag, e.step, round(e.value, 5)) for tag in events.Tags()["scalars"] for e in events.Scalars(tag))
