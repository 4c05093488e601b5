"""Training checkpoints, for --resume: everything that decides the rest of a run, so that a run killed at any moment
and resumed ends with the same weights as one never interrupted.

`output/checkpoints/step-N/` holds
- trainable.safetensors: the parameters that train (all weights, or the LoRA adapters), by module name;
- state.pt: optimizer and LR-scheduler state, and the torch RNG states (LoRA dropout draws from them);
- run.json: the step, the options of the run and what it logged so far (for the final loss curve).
The data order needs no state: it is a function of (seed, epoch), and the step says where in it the run is.
A checkpoint is written under a temporary name and renamed when complete, so a kill while writing leaves the previous
one intact; only the latest is kept.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, InputError
from .options import RESUME_FIXED, FinetuneOptions

FOLDER = "checkpoints"
NAME = re.compile(r"step-(\d+)")


def latest(output: Path) -> Path | None:
    """The last complete checkpoint of the run in `output`, if any."""
    found = [(int(m.group(1)), p) for p in (output / FOLDER).glob("step-*") if (m := NAME.fullmatch(p.name))]
    return max(found)[1] if found else None


def save(output: Path, step: int, model: torch.nn.Module, optimizer, scheduler, options: FinetuneOptions,
         history: list[dict]) -> Path:
    root = output / FOLDER
    tmp, final = root / f".step-{step}.tmp", root / f"step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}, tmp / "state.pt")
    (tmp / "run.json").write_text(json.dumps({"step": step, "options": dataclasses.asdict(options),
                                                   "history": history}, indent=2))
    tmp.rename(final)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, model: torch.nn.Module, optimizer, scheduler, options: FinetuneOptions) -> tuple[int, list[dict]]:
    """Restore a checkpoint into the freshly built model, optimizer and scheduler; return (its step, its history)."""
    try:
        run = json.loads((path / "run.json").read_text(encoding="utf-8"))
        saved = run["options"]
        step = int(run["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/run.json: can't read the checkpoint's run description ({e})") from e
    current = dataclasses.asdict(options)
    changed = [k for k in RESUME_FIXED if _plain(saved.get(k)) != _plain(current[k])]
    if changed:
        raise InputError(f"Can't resume from {path}: the run used different "
                         + ", ".join(f"{k} ({saved.get(k)!r}, now {current[k]!r})" for k in changed)
                         + ". Resume with the same options, or start a new run in another --output")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    try:
        tensors = load_file(str(path / "trainable.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch.load raise several types for a truncated or corrupt file
        raise CheckpointError(f"{path}: the checkpoint's files can't be read ({e})") from e
    if set(tensors) != set(params):
        raise CheckpointError(f"{path}/trainable.safetensors holds other parameters than this run trains "
                              f"({len(tensors)} saved, {len(params)} trainable)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return step, run.get("history", [])


def _plain(value):
    """JSON round trip: tuples saved as lists compare equal."""
    return json.loads(json.dumps(value))
