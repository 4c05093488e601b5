"""`finetune(options)`: the whole run -- read the data, build the model (LoRA, QLoRA or full), train, write the result
(and the loss curve with a summary)."""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import require_peft
from ..errors import InputError
from ..hub import resolve
from ..model import Model
from ..processing import Processor
from . import checkpoint, qlora
from .extras import need
from .export import copy_processor_files, save_released
from .formats import read_data
from .lora import add_lora, merge, merged_onto, save_adapter
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
    if o.qlora:
        qlora.check_base(folder)
        need("bitsandbytes", "--qlora (4-bit NF4 base weights)")
        require_peft("--qlora trains LoRA adapters")
    processor = Processor.from_pretrained(folder)
    size = {"longest_edge": o.image_longest_edge} if o.image_longest_edge else None
    processor.image_processor = processor.image_processor.with_overrides(size=size,
                                                                         do_image_splitting=o.do_image_splitting)
    records, bad = read_data(o.data, o.data_format, processor, o.skip_bad_records)
    eval_records = None
    if o.eval:
        eval_records, bad_eval = read_data(o.eval, o.data_format, processor, o.skip_bad_records)
        bad += bad_eval
    for e in bad:
        print(f"smolvlm finetune: skipping {e}", file=sys.stderr)

    torch.manual_seed(o.seed)  # LoRA's initial weights and dropout draw from it
    device = o.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = qlora.compute_dtype(getattr(torch, o.dtype), torch.device(device)) if o.qlora else o.dtype
    if o.qlora:
        model = qlora.load_quantized(folder, dtype, torch.device(device))
    else:
        model = Model.from_pretrained(folder, dtype=dtype, device=device)
    peft_model = None
    if o.full:
        if o.freeze_vision:
            model.model.vision_model.requires_grad_(False)
    else:
        peft_model = add_lora(model, o.lora_r, o.lora_alpha, o.lora_dropout, o.lora_targets, o.model)
    if o.gradient_checkpointing or o.qlora:  # QLoRA is about memory: recompute activations too
        enable_gradient_checkpointing(model)

    total = o.steps or math.ceil(o.epochs * math.ceil(len(records) / o.batch_size) / o.grad_accum)
    trainer = Trainer(model, processor, records, eval_records, o, total)
    start = 0
    if resume_from is not None:
        start, trainer.history[:] = checkpoint.load(resume_from, model, trainer.optimizer, trainer.scheduler, o)
        print(f"smolvlm finetune: resuming from {resume_from} (step {start} of {total})", file=sys.stderr)
    reports = trainer.run(start)

    adapter = None
    if peft_model is None:
        save_released(model, output, folder)
    else:
        adapter = output / "adapter" if o.merge else output
        copy_processor_files(folder, adapter)
        save_adapter(peft_model, adapter)  # writes adapter_config.json last (without --merge it marks a finished run)
        if o.merge:
            # QLoRA: the adapters fold into the full-precision base in its own dtype (what transformers + peft load
            # them onto), not into its NF4 copy.
            save_released(merged_onto(folder, adapter) if o.qlora else merge(peft_model), output, folder)
    shutil.rmtree(output / checkpoint.FOLDER, ignore_errors=True)  # the run is complete: nothing left to resume
    skipped = [str(e) for e in bad] + list(trainer.skipped.values())
    result = FinetuneResult(output, adapter, total, trainer.last_loss, trainer.last_eval, skipped)
    reports.finish({"model": o.model, "data": o.data, "method": "full" if o.full else "QLoRA" if o.qlora else "LoRA",
                    "steps": total, "final train loss": result.train_loss, "final eval loss": result.eval_loss,
                    "adapter": adapter, "skipped records": len(skipped) or None})
    return result


def _prepare_output(output: Path, resume: bool) -> Path | None:
    """Create the output folder; the checkpoint to resume from (None: start at step 0)."""
    for name in ("config.json", "adapter_config.json", "summary.md"):
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
