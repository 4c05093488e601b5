"""Where a run's numbers go, selected like HF Trainer's `report_to`: log.jsonl (the default), TensorBoard event files
in tb/ (the `tensorboard` package's writer through torch.utils.tensorboard: no TensorFlow), log.csv; and at the end a
loss-curve PNG (matplotlib) and summary.md linking it.

Every entry is {"step": N, "loss"/"lr"/"tokens_per_s": ...} or {"step": N, "eval_loss": ...}. A resumed run first
drops what a killed run reported after its checkpoint (those steps run again).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import InputError
from .extras import need

CSV_FIELDS = ("step", "loss", "eval_loss", "lr", "tokens_per_s")


class Jsonl:
    def __init__(self, output: Path, start: int):
        self.path = output / "log.jsonl"
        if self.path.is_file():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if _step(line, json.loads) <= start]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def log(self, entry: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def close(self) -> None:
        pass


class Csv:
    def __init__(self, output: Path, start: int):
        self.path = output / "log.csv"
        rows = []
        if self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if _step(r.get("step"), int) <= start]
        with self.path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def log(self, entry: dict) -> None:
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, CSV_FIELDS).writerow(entry)

    def close(self) -> None:
        pass


class TensorBoard:
    def __init__(self, output: Path, start: int):
        need("tensorboard", "--report-to tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events a killed run wrote after the checkpoint it resumes from.
        self.writer = SummaryWriter(str(output / "tb"), purge_step=start + 1 if start else None)

    def log(self, entry: dict) -> None:
        for key, value in entry.items():
            if key != "step":
                self.writer.add_scalar("eval/loss" if key == "eval_loss" else f"train/{key}", value, entry["step"])

    def close(self) -> None:
        self.writer.close()


REPORTERS = {"jsonl": Jsonl, "csv": Csv, "tensorboard": TensorBoard}


def _step(value, parse) -> float:
    """The step of a logged line or row; infinity for one cut short by a kill (it is dropped)."""
    try:
        parsed = parse(value)
        return int(parsed["step"] if isinstance(parsed, dict) else parsed)
    except (ValueError, KeyError, TypeError):
        return float("inf")


class Reports:
    """The selected reporters, plus the run's history (kept in checkpoints) for the loss curve."""

    def __init__(self, output: Path, report_to: tuple[str, ...], start: int, history: list[dict]):
        self.output, self.history = output, history
        self.reporters = [REPORTERS[name](output, start) for name in report_to]

    def log(self, **entry) -> None:
        self.history.append(entry)
        for reporter in self.reporters:
            reporter.log(entry)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()

    def finish(self, summary: dict) -> None:
        """loss.png (train and eval loss per step) and summary.md with the run's results and the plot. Without
        matplotlib (a full fine-tune needs no extra) the summary says how to get the plot instead."""
        try:
            plot = self._plot()
        except InputError as e:
            plot = f"No loss curve: {e}"
        lines = ["# Fine-tuning run", ""] + [f"- {k}: {v}" for k, v in summary.items() if v is not None]
        logs = [name for name in ("log.jsonl", "log.csv", "tb") if (self.output / name).exists()]
        if logs:
            lines += ["", "Logs: " + ", ".join(f"[{n}]({n})" for n in logs)]
        (self.output / "summary.md").write_text("\n".join(lines + ["", plot, ""]), encoding="utf-8")

    def _plot(self) -> str:
        need("matplotlib", "the loss-curve plot (loss.png)")
        import matplotlib

        matplotlib.use("Agg")  # files only: no display
        from matplotlib import pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
            points = [(e["step"], e[key]) for e in self.history if key in e]
            if points:
                ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (mean over assistant tokens)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.output / "loss.png")
        plt.close(fig)
        return "![loss curve](loss.png)"
