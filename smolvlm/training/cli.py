"""`smolvlm finetune`: registered by smolvlm/cli.py as "smolvlm.training.cli:add_finetune".

Every flag is a FinetuneOptions field (the Python entry point takes the same names); flags not given keep the
dataclass defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from ..hub import DEFAULT_MODEL

from .options import DATA_FORMATS, LORA_TARGETS, REPORTERS, SCHEDULES, FinetuneOptions

DEFAULTS = {f.name: f.default for f in dataclasses.fields(FinetuneOptions)}


def add_finetune(subparsers) -> None:
    from ..cli import image_options

    p = subparsers.add_parser(
        "finetune", argument_default=argparse.SUPPRESS,
        help="fine-tune a model on chat conversations (LoRA, QLoRA or full)",
        description="Fine-tune on chat conversations: our JSONL ({\"messages\": [...]} per line; images by path "
                    "relative to the file, URL or base64), ShareGPT/LLaVA JSON(L), or a Hugging Face `datasets` "
                    "folder or Parquet file. The loss is on the assistant's tokens only.")
    p.add_argument("--model", "-m", default=os.environ.get("SMOLVLM_MODEL") or DEFAULT_MODEL,
                   help="checkpoint folder or hub repo id to start from (default: $SMOLVLM_MODEL or %(default)s)")
    p.add_argument("--revision", help="hub revision of --model")
    p.add_argument("--data", required=True, help="training conversations (file or `datasets` folder)")
    p.add_argument("--data-format", choices=DATA_FORMATS,
                   help="messages (our JSONL), sharegpt (ShareGPT/LLaVA), datasets (saved folder or Parquet); "
                        "default: detected")
    p.add_argument("--eval", help="evaluation conversations (same format as --data): eval loss every --eval-every "
                                  "steps and at the end")
    p.add_argument("--output", "-o", required=True,
                   help="run folder: checkpoints while training, then the model (or LoRA adapter)")

    what = p.add_argument_group("what trains")
    kind = what.add_mutually_exclusive_group()
    kind.add_argument("--lora-r", type=int, help=f"LoRA rank (default: LoRA with rank {DEFAULTS['lora_r']})")
    kind.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    what.add_argument("--qlora", action="store_true",
                      help="LoRA on a 4-bit NF4 base (bitsandbytes; bf16 compute, gradient checkpointing)")
    what.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default: 2 x rank)")
    what.add_argument("--lora-dropout", type=float, help=f"default: {DEFAULTS['lora_dropout']}")
    what.add_argument("--lora-targets", help=f"comma-separated, of {', '.join(LORA_TARGETS)} (default: text: the "
                                             "text model's attention and MLP projections)")
    what.add_argument("--freeze-vision", action="store_true", help="full fine-tuning: keep the vision encoder fixed")
    image_options(what)
    what.add_argument("--merge", action="store_true",
                      help="LoRA: write the merged model (released format) to --output and the adapter to "
                           "--output/adapter")

    how = p.add_argument_group("schedule")
    length = how.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help=f"passes over the data (default: {DEFAULTS['epochs']})")
    length.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    how.add_argument("--lr", type=float, help="peak learning rate (default: 2e-4 with LoRA, 1e-5 with --full)")
    how.add_argument("--lr-schedule", choices=SCHEDULES, help=f"after warmup (default: {DEFAULTS['lr_schedule']})")
    how.add_argument("--warmup-steps", type=int, help=f"default: {DEFAULTS['warmup_steps']}")
    how.add_argument("--weight-decay", type=float, help=f"AdamW's (default: {DEFAULTS['weight_decay']})")
    how.add_argument("--max-grad-norm", type=float, help=f"clip gradients to this norm, 0 = off "
                                                         f"(default: {DEFAULTS['max_grad_norm']})")
    how.add_argument("--batch-size", type=int, help=f"conversations per micro-batch (default: {DEFAULTS['batch_size']})")
    how.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step (default: {DEFAULTS['grad_accum']})")
    how.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory, slower")
    how.add_argument("--dtype", help="weights' dtype while training and in the output (default: float32; with "
                                     "--qlora bfloat16, the compute dtype of the 4-bit layers)")
    how.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available, else cpu)")
    how.add_argument("--seed", type=int, help=f"decides LoRA's initial weights, dropout and the data order "
                                              f"(default: {DEFAULTS['seed']})")

    run = p.add_argument_group("run")
    run.add_argument("--save-every", type=int, help=f"steps between checkpoints (default: {DEFAULTS['save_every']})")
    run.add_argument("--eval-every", type=int, help=f"steps between eval losses (default: {DEFAULTS['eval_every']})")
    run.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    run.add_argument("--skip-bad-records", action="store_true",
                     help="skip records that can't be used (and report how many) instead of stopping")
    run.add_argument("--report-to", help=f"comma-separated, of {', '.join(REPORTERS)}, or none (default: jsonl)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=run_finetune)


def options_from_args(args: argparse.Namespace) -> FinetuneOptions:
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS}
    if given.get("max_grad_norm") == 0:
        given["max_grad_norm"] = None
    return FinetuneOptions(**given)


def run_finetune(args: argparse.Namespace) -> int:
    from .run import finetune

    result = finetune(options_from_args(args))
    summary = f"wrote {result.output} after {result.steps} steps"
    if result.train_loss is not None:
        summary += f": loss {result.train_loss:.4f}"
    if result.eval_loss is not None:
        summary += f", eval loss {result.eval_loss:.4f}"
    if result.adapter is not None and result.adapter != result.output:
        summary += f"; LoRA adapter in {result.adapter}"
    if result.skipped:
        summary += f"; skipped {len(result.skipped)} bad records"
    print(summary + f"; summary and loss curve in {result.output / 'summary.md'}")
    return 0
