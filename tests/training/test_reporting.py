"""--report-to selects the logs; every run ends with loss.png and summary.md linking it (and the logs)."""

import csv
import sys

import pytest

from smolvlm import InputError
from smolvlm.training import finetune


def run(tiny, dataset, output, **options):
    return finetune(model=str(tiny), data=str(dataset), output=str(output), full=True, steps=3, batch_size=2,
                    eval=str(dataset), eval_every=2, progress=False, **options)


def test_report_to_csv_and_the_loss_curve(tiny_v2, dataset, tmp_path):
    out = run(tiny_v2, dataset, tmp_path / "out", report_to="csv").output
    assert not (out / "log.jsonl").exists() and not (out / "tb").exists()
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [(r["step"], bool(r["loss"]), bool(r["eval_loss"])) for r in rows] == \
        [("1", True, False), ("2", True, False), ("2", False, True), ("3", True, False), ("3", False, True)]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "![loss curve](loss.png)" in summary and "[log.csv](log.csv)" in summary and "- method: full" in summary


def test_no_matplotlib_still_finishes_and_says_why(tiny_v2, dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    out = run(tiny_v2, dataset, tmp_path / "out", report_to="none").output
    assert (out / "model.safetensors").is_file() and not (out / "loss.png").exists()
    assert not (out / "log.jsonl").exists()
    assert "No loss curve: the loss-curve plot (loss.png) needs the Python package 'matplotlib'" in \
        (out / "summary.md").read_text()
    assert "smolvlm[train]" in (out / "summary.md").read_text()


def test_bad_report_to_is_named(tiny_v2, dataset, tmp_path):
    with pytest.raises(InputError, match=r"'report_to' = 'wandb': expected a comma-separated list of jsonl, "
                                         r"tensorboard, csv \(or none\)"):
        run(tiny_v2, dataset, tmp_path / "out", report_to="wandb")
