"""Turn a local folder or a Hugging Face Hub repo id into a local folder holding the checkpoint files.

Downloads go through huggingface_hub, so its cache, revisions, tokens and offline mode (HF_HUB_OFFLINE=1)
all behave as users of transformers expect.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"  # every command's --model (or $SMOLVLM_MODEL)

# Everything a checkpoint folder holds that we read: configs, tokenizer, chat template, weights.
CHECKPOINT_PATTERNS = ["*.json", "*.jinja", "*.safetensors"]

LOCAL_FOLDER_HINT = (
    "To use a checkpoint without the hub, download the repo's files on a machine that can reach it "
    "(e.g. `hf download {repo}`) and pass the folder instead: --model /path/to/folder"
)


def resolve(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """Return the local folder of a checkpoint, downloading it from the hub (into the HF cache) if needed."""
    name = os.fspath(path_or_repo_id)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{name} is a file; expected a checkpoint folder (with config.json) or a hub repo id")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(
            f"No checkpoint folder at {name}, and it is not a hub repo id of the form 'owner/name'"
        )
    return _download(name, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hint = LOCAL_FOLDER_HINT.format(repo=repo_id)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
    except GatedRepoError as e:
        raise CheckpointError(f"{repo_id} is gated on the hub: log in (`hf auth login`) with access to it. {hint}") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(f"Unknown model {repo_id!r}: no such repo on the Hugging Face Hub (or it is private)") from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"{repo_id} has no revision {revision!r} on the hub") from e
    except LocalEntryNotFoundError as e:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            why = "HF_HUB_OFFLINE is set and it is not in the local cache"
        else:
            why = "the Hugging Face Hub can't be reached and it is not in the local cache"
        raise CheckpointError(f"Can't load {repo_id}: {why}. {hint}") from e
    except OSError as e:  # network errors other than the above, disk full, permissions
        raise CheckpointError(f"Can't download {repo_id} from the hub: {e}. {hint}") from e
