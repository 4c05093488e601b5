"""Read safetensors checkpoints (one file or shards + index) straight into a module built on the meta device.

Every tensor is read on its own, converted to the target dtype on the target device, and assigned in place of the
meta parameter, so loading never holds a second full copy of the weights. Key names are checked against the module
up front, and every missing, unexpected or mis-shaped key is reported in one error.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import CheckpointError, InputError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_dtype(dtype: str | torch.dtype | None, checkpoint_dtype: str | None = None) -> torch.dtype:
    """torch dtype for a user's `dtype` (name or torch.dtype); None or "auto": the checkpoint's own, else fp32."""
    if dtype is None or dtype == "auto":
        dtype = checkpoint_dtype or "float32"
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and ALIASES.get(dtype, dtype) in DTYPES:
        return DTYPES[ALIASES.get(dtype, dtype)]
    raise InputError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """torch device for a user's `device` (default CPU), checked to be usable here."""
    try:
        device = torch.device(device or "cpu")
        if device.type == "meta":
            raise RuntimeError("weights can't be loaded onto the meta device")
        torch.empty(0, device=device)  # e.g. "cuda" on a machine without CUDA fails here, not mid-load
    except (RuntimeError, AssertionError) as e:
        raise InputError(f"device {str(device)!r} can't be used: {e}") from e
    return device


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt options


def _mallopt(option: int, value: int) -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt(option, value)
    except (OSError, AttributeError):  # not glibc: nothing to set
        pass


def return_large_frees_to_os() -> None:
    """Make glibc's malloc hand every freed block of 1 MiB or more straight back to the OS (mmap/munmap); called by
    `Model.from_pretrained` on the CPU before it reads a weight, and by the trainer.

    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB), after which large
    blocks come from the heap, interleave with small long-lived ones and leave holes the heap can't shrink past.
    Loading frees a temporary per layer (a weight read to be packed, quantized or, for QLoRA, 4-bit-quantized: up to
    8192 x 2048 bf16 = 32 MiB), and with the adjusted threshold the weights kept landed in a heap full of holes:
    ~1.3 GiB at the SmolVLM2-2.2B shape for QLoRA, whose training step then touched a varying part of them again (peak
    RSS 2.0-2.9 GiB from run to run), and 17-40 MB of a fused 256M model's resident memory for inference. During a
    training step it keeps per-layer temporaries (activations, a 4-bit weight dequantized for its matmul) from growing
    the heap layer after layer. No-op where the C library is not glibc."""
    _mallopt(M_MMAP_THRESHOLD, 1 << 20)


def reuse_large_frees() -> None:
    """Once a model is fused for inference (`fast.fuse`, as `from_pretrained(fuse=True)` does): blocks below 32 MiB come
    from the heap again and up to 64 MiB of free heap top stays mapped (glibc's own adaptive maximums). A matmul's
    temporaries (oneDNN's output and scratch, MBs each for a vision tile) then reuse memory already paged in instead of
    a fresh mmap that faults in every page on every call: under the 1 MiB threshold the vision tower's matmuls ran at
    half speed (fc1 of one 1024-patch tile 4.3 -> 8.5 ms on 2 threads). The weights are in place by then, so no load
    temporary is left to make holes."""
    _mallopt(M_MMAP_THRESHOLD, 32 << 20)
    _mallopt(M_TRIM_THRESHOLD, 64 << 20)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: model.safetensors, or the shards its index names."""
    folder = Path(folder)
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            why = f"not a valid safetensors index (expected a 'weight_map' object): {e!r}"
            raise CheckpointError(f"{index}: {why}") from e
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names weight files that are not in {folder}: {', '.join(missing)}")
        return [folder / n for n in names]
    other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.safetensors"))
    found = f" (found only {', '.join(other)}; only {SINGLE} or sharded safetensors with {INDEX} are read)"
    raise CheckpointError(f"No weights in {folder}: expected {SINGLE} or {INDEX}{found if other else ''}")


def read_shapes(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """key -> (file, shape) from the files' headers, without reading any tensor data."""
    found = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    found[key] = (path, tuple(f.get_slice(key).get_shape()))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    return found


def check_keys(module: nn.Module, found: dict, folder: Path, skip: frozenset[str] = frozenset()) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if k not in skip}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - skip)
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k][1])
    if not (missing or unexpected or wrong):
        return
    lines = [f"The weights in {folder} don't match the model its config.json describes:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        listed = ", ".join(f"{k} (in {found[k][0].name})" for k in unexpected)
        lines.append(f"  unexpected keys ({len(unexpected)}): {listed}")
    for k in wrong:
        file, shape = found[k]
        lines.append(f"  wrong shape: {k} is {list(shape)} in {file.name}, the config needs {list(expected[k])}")
    raise CheckpointError("\n".join(lines))


def load_weights(
    module: nn.Module,
    folder: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    skip: frozenset[str] = frozenset(),
    defer: frozenset[str] = frozenset(),
) -> None:
    """Fill `module`'s parameters (built on the meta device) from the checkpoint in `folder`.

    Keys in `skip` are neither required nor loaded (e.g. a tied lm_head.weight); keys in `defer` are checked but left
    on the meta device (for `read_tensors`).
    """
    folder = Path(folder)
    files = weight_files(folder)
    found = read_shapes(files)
    check_keys(module, found, folder, skip)
    for path in files:
        for key, tensor in _tensors(path, lambda keys: [k for k in keys if k not in skip and k not in defer], dtype,
                                    device):
            _assign(module, key, tensor)
            del tensor


def read_tensors(folder: str | Path, keys: list[str], dtype: torch.dtype, device: torch.device) -> dict:
    """key -> tensor (floating point ones in `dtype`) for `keys` of the checkpoint in `folder` (already checked by
    `load_weights`). The files are mapped only for this call, so the pages read don't stay resident after the caller
    drops the tensors (loading maps the files for the model's lifetime; copying from there would keep both copies)."""
    wanted = set(keys)
    return {
        key: tensor
        for path in weight_files(Path(folder))
        for key, tensor in _tensors(path, lambda found: wanted.intersection(found), dtype, device)
    }


def read_tensor(path: Path, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One tensor of the safetensors file `path` (in `dtype` if floating point), the file mapped only while the tensor
    lives (see `read_tensors`)."""
    ((_, tensor),) = _tensors(path, lambda found: [key], dtype, device)
    return tensor


def _tensors(path: Path, select, dtype: torch.dtype, device: torch.device):
    """(key, tensor) for the keys `select(keys of the file)` picks, floating point ones in `dtype`, one at a time;
    a file that can't be read raises a CheckpointError naming it."""
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for key in select(f.keys()):
                tensor = f.get_tensor(key)
                yield key, tensor.to(dtype) if tensor.is_floating_point() else tensor
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: can't read its tensors (truncated or corrupt?): {e}") from e


def _assign(root: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner, _, name = key.rpartition(".")
    module = root.get_submodule(owner)
    if name in module._parameters:
        setattr(module, name, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))
    else:
        setattr(module, name, tensor)  # a persistent buffer
