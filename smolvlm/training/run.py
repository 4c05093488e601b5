"""`finetune(options)`: the whole run -- read the data, build the model (LoRA or full), train, write the result."""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..hub import resolve
from ..model import Model
from ..processing import Processor
from . import checkpoint
from .data import read_jsonl
from .export import copy_processor_files, save_released
from .lora import add_lora, merge, save_adapter
from .loss import enable_gradient_checkpointing
from .options import FinetuneOptions
from .trainer import Trainer


@dataclass
class FinetuneResult:
    output: Path  # the fine-tuned model (full, or LoRA merged) or the LoRA adapter
    adapter: Path | None  # the LoRA adapter folder (output itself, or output/adapter with merge)
    steps: int
    train_loss: float | None  # the last step's
    eval_loss: float | None  # at the end, with an eval file
    skipped: list[str]  # why each skipped record was bad (with skip_bad_records)


def finetune(options: FinetuneOptions | None = None, **kwargs) -> FinetuneResult:
    """Fine-tune `options.model` on `options.data` and write the result to `options.output`.

    Takes a FinetuneOptions, keyword arguments naming its fields, or both (keywords override)."""
    o = (dataclasses.replace(options, **kwargs) if options else FinetuneOptions(**kwargs)).checked()
    output = Path(o.output)
    resume_from = _prepare_output(output, o.resume)
    folder = resolve(o.model, o.revision)
    processor = Processor.from_pretrained(folder)
    size = {"longest_edge": o.image_longest_edge} if o.image_longest_edge else None
    processor.image_processor = processor.image_processor.with_overrides(size=size,
                                                                         do_image_splitting=o.do_image_splitting)
    records, bad = read_jsonl(o.data, processor, o.skip_bad_records)
    eval_records = None
    if o.eval:
        eval_records, bad_eval = read_jsonl(o.eval, processor, o.skip_bad_records)
        bad += bad_eval
    for e in bad:
        print(f"smolvlm finetune: skipping {e}", file=sys.stderr)

    torch.manual_seed(o.seed)  # LoRA's initial weights and dropout draw from it
    device = o.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Model.from_pretrained(folder, dtype=o.dtype, device=device)
    peft_model = None
    if o.full:
        if o.freeze_vision:
            model.model.vision_model.requires_grad_(False)
    else:
        peft_model = add_lora(model, o.lora_r, o.lora_alpha, o.lora_dropout, o.lora_targets, o.model)
    if o.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    total = o.steps or math.ceil(o.epochs * math.ceil(len(records) / o.batch_size) / o.grad_accum)
    trainer = Trainer(model, processor, records, eval_records, o, total)
    start = 0
    if resume_from is not None:
        start = checkpoint.load(resume_from, model, trainer.optimizer, trainer.scheduler, o)
        print(f"smolvlm finetune: resuming from {resume_from} (step {start} of {total})", file=sys.stderr)
    trainer.run(start)

    adapter = None
    if peft_model is None:
        save_released(model, output, folder)
    else:
        adapter = output / "adapter" if o.merge else output
        copy_processor_files(folder, adapter)
        save_adapter(peft_model, adapter)  # writes adapter_config.json last (without --merge it marks a finished run)
        if o.merge:
            save_released(merge(peft_model), output, folder)
    shutil.rmtree(output / checkpoint.FOLDER, ignore_errors=True)  # the run is complete: nothing left to resume
    skipped = [str(e) for e in bad] + list(trainer.skipped.values())
    return FinetuneResult(output, adapter, total, trainer.last_loss, trainer.last_eval, skipped)


def _prepare_output(output: Path, resume: bool) -> Path | None:
    """Create the output folder; the checkpoint to resume from (None: start at step 0)."""
    for name in ("config.json", "adapter_config.json"):
        if (output / name).exists():
            raise InputError(f"{output} already holds a fine-tuned model ({name}); choose another --output")
    last = checkpoint.latest(output)
    if last is not None and not resume:
        raise InputError(f"{output} holds an unfinished run (checkpoint {last.name}): pass --resume to continue it, "
                         "or choose another --output")
    if resume and last is None:
        print(f"smolvlm finetune: no checkpoint in {output} yet; starting from step 0", file=sys.stderr)
    output.mkdir(parents=True, exist_ok=True)
    return last if resume else None
