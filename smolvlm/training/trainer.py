"""The training loop: micro-batches in a seeded order, gradient accumulation, clipping, AdamW with a warmup + decay
schedule, eval loss at intervals, checkpoints, a tqdm progress bar and the reporters of `reporting` (log.jsonl...).

Records are a sequence (a list, or a `datasets` table read row by row): a micro-batch reads only its own records."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from ..model import Model
from ..processing import Processor
from . import checkpoint
from .data import BadRecord, Record, collate, encode, micro_batch
from .loss import label_count, loss_sum
from .options import FinetuneOptions
from .reporting import Reports


def lr_factor(schedule: str, warmup: int, total: int):
    """LambdaLR's multiplier: linear warmup over `warmup` steps, then cosine / linear decay to 0, or constant."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress if schedule == "linear" else 1.0

    return factor


class Trainer:
    def __init__(self, model: Model, processor: Processor, records: Sequence[Record],
                 eval_records: Sequence[Record] | None,
                 options: FinetuneOptions, total_steps: int):
        self.model, self.processor, self.options = model, processor, options
        self.records, self.eval_records = records, eval_records
        self.total_steps = total_steps
        self.params = [p for p in model.parameters() if p.requires_grad]
        fused = model.device.type in ("cpu", "cuda")  # one kernel for all parameters: several times faster
        self.optimizer = torch.optim.AdamW(self.params, lr=options.lr, weight_decay=options.weight_decay, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(options.lr_schedule, options.warmup_steps, total_steps))
        self.output = Path(options.output)
        self.history: list[dict] = []  # everything logged, kept in checkpoints for the final loss curve
        self.skipped: dict[tuple[int, int], str] = {}  # (records, index) -> why, for records that failed to encode
        self.last_loss: float | None = None
        self.last_eval: float | None = None

    # -- data --

    def _batch(self, records: Sequence[Record], indices: list[int]) -> dict | None:
        """The collated batch of these records on the model's device (None if every one of them is bad)."""
        examples = []
        for i in indices:
            try:
                examples.append(encode(records[i], self.processor))
            except BadRecord as e:
                if not self.options.skip_bad_records:
                    raise
                if (id(records), i) not in self.skipped:
                    self.skipped[id(records), i] = str(e)
                    tqdm.write(f"smolvlm finetune: skipping {e}", file=sys.stderr)
        if not examples:
            return None
        batch = collate(examples, self.processor.pad_token_id)
        return {k: v if v is None else v.to(self.model.device) for k, v in batch.items()}

    # -- loop --

    def run(self, start_step: int) -> Reports:
        o = self.options
        reports = Reports(self.output, o.report_to, start_step, self.history)
        bar = tqdm(total=self.total_steps, initial=start_step, desc="finetune", unit="step", disable=not o.progress,
                   file=sys.stderr, dynamic_ncols=True)
        self.model.train()
        for step in range(start_step + 1, self.total_steps + 1):  # 1-based: the number of steps done after it
            began = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]
            self.last_loss, tokens = self._step(step)
            speed = tokens / (time.perf_counter() - began)
            reports.log(step=step, loss=round(self.last_loss, 6), lr=lr, tokens_per_s=round(speed, 1))
            bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}", refresh=False)
            bar.update(1)
            done = step == self.total_steps
            if self.eval_records and (done or step % o.eval_every == 0):
                self.last_eval = self.evaluate()
                reports.log(step=step, eval_loss=round(self.last_eval, 6))
                tqdm.write(f"step {step}: eval loss {self.last_eval:.4f}", file=sys.stderr)
            if not done and step % o.save_every == 0:
                checkpoint.save(self.output, step, self.model, self.optimizer, self.scheduler, o, self.history)
        bar.close()
        reports.close()
        return reports

    def _step(self, step: int) -> tuple[float, int]:
        """One optimizer step over micro-batches (step - 1) * grad_accum ...; (mean token loss, tokens seen)."""
        o = self.options
        first = (step - 1) * o.grad_accum
        batches = [b for k in range(o.grad_accum)
                   if (b := self._batch(self.records, micro_batch(len(self.records), o.batch_size, o.seed, first + k)))]
        count = sum(label_count(b) for b in batches)
        total = torch.zeros((), device=self.model.device)
        for batch in batches:
            loss, _ = loss_sum(self.model, batch)
            (loss / count).backward()  # token-weighted over the whole accumulation window
            total += loss.detach()
        if count:  # (0 only when every record of the step was bad and skipped)
            if o.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, o.max_grad_norm)
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total) / max(count, 1), sum(int(b["attention_mask"].sum()) for b in batches)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the eval records (in file order)."""
        self.model.eval()
        total, count = 0.0, 0
        bs = self.options.batch_size
        for start in range(0, len(self.eval_records), bs):
            batch = self._batch(self.eval_records, list(range(start, min(start + bs, len(self.eval_records)))))
            if batch is not None:
                loss, n = loss_sum(self.model, batch)
                total, count = total + float(loss), count + int(n)
        self.model.train()
        return total / max(count, 1)
