"""`FinetuneOptions`: everything a fine-tuning run reads, shared by the Python entry point and `smolvlm finetune`.

Kept free of torch so the CLI can build its parser without importing it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import InputError

LORA_TARGETS = ("text", "connector", "vision")
SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_LR = {"lora": 2e-4, "full": 1e-5}
DATA_FORMATS = ("auto", "messages", "sharegpt", "datasets")
REPORTERS = ("jsonl", "tensorboard", "csv")

# Options that must not change between a run and its --resume: they decide the weights, the data order or the
# optimizer's shape. (The others, like --save-every or --eval, may change.)
RESUME_FIXED = ("model", "revision", "data", "full", "qlora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
                "freeze_vision", "lr", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm", "batch_size",
                "grad_accum", "seed", "dtype", "do_image_splitting", "image_longest_edge")


@dataclass
class FinetuneOptions:
    """A fine-tuning run. `model`, `data` and `output` are required; every other field has a working default."""

    model: str
    data: str  # conversations: our JSONL, ShareGPT/LLaVA JSON(L), or a `datasets` folder / Parquet file
    output: str  # the run folder: checkpoints while training, the fine-tuned model (or adapter) at the end
    eval: str | None = None  # JSONL like `data`; its loss is reported every eval_every steps and at the end
    revision: str | None = None  # hub revision of `model`
    data_format: str = "auto"  # messages, sharegpt or datasets; auto: detected from the path and the first record
    # What is trained: LoRA adapters of rank lora_r (the default), or every weight with full=True.
    full: bool = False
    qlora: bool = False  # LoRA on a base whose linear layers are held in 4-bit NF4 (bitsandbytes)
    lora_r: int = 8
    lora_alpha: float | None = None  # None: 2 * lora_r
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("text",)  # LoRA on the text model's projections, + "connector" / "vision"
    freeze_vision: bool = False  # full fine-tuning: keep the vision encoder as it is
    merge: bool = False  # LoRA: write the merged model in the released format (the adapter goes to output/adapter)
    # Images: split into tiles or not, and the resize before (None: the checkpoint's). One tile per image trains
    # several times faster and in far less memory.
    do_image_splitting: bool | None = None
    image_longest_edge: int | None = None
    # How long and how: `steps` optimizer steps, or `epochs` passes over the data when steps is None.
    epochs: int = 1
    steps: int | None = None
    lr: float | None = None  # None: 2e-4 with LoRA, 1e-5 for full fine-tuning
    lr_schedule: str = "cosine"  # after warmup: cosine or linear decay to 0, or constant
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping
    batch_size: int = 4
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    dtype: str | None = None  # the weights' dtype while training (and in the output); None: float32, QLoRA bfloat16
    device: str | None = None  # None: cuda if available, else cpu
    seed: int = 0
    # Checkpoints, evaluation, data problems, output.
    save_every: int = 500  # steps between checkpoints (for --resume)
    eval_every: int = 500  # steps between eval losses (with `eval`)
    resume: bool = False  # continue the run in `output` from its last checkpoint
    skip_bad_records: bool = False  # skip (and count) bad records instead of stopping at the first one
    progress: bool = True  # a tqdm progress bar on stderr
    report_to: tuple[str, ...] = ("jsonl",)  # loggers, of jsonl (log.jsonl), tensorboard (tb/), csv (log.csv)

    def checked(self) -> FinetuneOptions:
        """A copy with defaults filled in (lr, lora_alpha, lora_targets as a tuple); InputError names a bad option."""
        o = dataclasses.replace(self)
        if isinstance(o.lora_targets, str):
            o.lora_targets = tuple(t.strip() for t in o.lora_targets.split(",") if t.strip())
        o.lora_targets = tuple(o.lora_targets)
        if isinstance(o.report_to, str):
            o.report_to = tuple(t.strip() for t in o.report_to.split(",") if t.strip() and t.strip() != "none")
        o.report_to = tuple(o.report_to)
        for name in ("model", "data", "output"):
            if not isinstance(getattr(o, name), str) or not getattr(o, name):
                raise InputError(f"finetune option {name!r} is required (a path)")
        positive = ["batch_size", "grad_accum", "save_every", "eval_every", "epochs"] + (["lora_r"] if not o.full else [])
        optional = [name for name in ("steps", "image_longest_edge") if getattr(o, name) is not None]
        for name in positive + optional:
            value = getattr(o, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"finetune option {name!r} = {value!r}: expected a positive integer")
        if isinstance(o.warmup_steps, bool) or not isinstance(o.warmup_steps, int) or o.warmup_steps < 0:
            raise InputError(f"finetune option 'warmup_steps' = {o.warmup_steps!r}: expected an integer >= 0")
        if o.lr_schedule not in SCHEDULES:
            raise InputError(f"finetune option 'lr_schedule' = {o.lr_schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if not o.lora_targets or any(t not in LORA_TARGETS for t in o.lora_targets):
            raise InputError(f"finetune option 'lora_targets' = {','.join(o.lora_targets)!r}: expected a comma-separated "
                             f"list of {', '.join(LORA_TARGETS)}")
        if any(t not in REPORTERS for t in o.report_to):
            raise InputError(f"finetune option 'report_to' = {','.join(o.report_to)!r}: expected a comma-separated "
                             f"list of {', '.join(REPORTERS)} (or none)")
        if o.data_format not in DATA_FORMATS:
            raise InputError(f"finetune option 'data_format' = {o.data_format!r}: expected one of "
                             f"{', '.join(DATA_FORMATS)}")
        if o.qlora and o.full:
            raise InputError("--qlora trains LoRA adapters on a frozen 4-bit base; it can't be combined with --full "
                             "(full fine-tuning needs full-precision weights to update)")
        if not 0 <= o.lora_dropout < 1:
            raise InputError(f"finetune option 'lora_dropout' = {o.lora_dropout!r}: expected a number in [0, 1)")
        if o.full and o.merge:
            raise InputError("--merge applies to LoRA adapters; full fine-tuning already writes the whole model")
        if not o.full and o.freeze_vision:
            raise InputError("--freeze-vision applies to full fine-tuning; with LoRA only the adapters train (add "
                             "'vision' to --lora-targets to adapt the vision encoder)")
        o.lr = DEFAULT_LR["full" if o.full else "lora"] if o.lr is None else float(o.lr)
        if not o.lr > 0:
            raise InputError(f"finetune option 'lr' = {o.lr!r}: expected a positive number")
        if o.dtype is None:
            o.dtype = "bfloat16" if o.qlora else "float32"
        if o.lora_alpha is None:
            o.lora_alpha = 2 * o.lora_r
        return o
