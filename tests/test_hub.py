"""smolvlm.hub.resolve: local folders, bad paths, and a hub that is offline or unreachable (there is no network here)."""

import pytest

from smolvlm import CheckpointError, Model
from smolvlm.hub import resolve

REPO = "HuggingFaceTB/SmolVLM-256M-Instruct"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty HF cache, so a repo id can only come from the (unreachable) hub."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_local_folder(tmp_path):
    assert resolve(tmp_path) == tmp_path
    assert resolve(str(tmp_path)) == tmp_path


def test_missing_folder(tmp_path):
    for name in (str(tmp_path / "nope"), "./nope", "~/nope-smolvlm"):
        with pytest.raises(CheckpointError) as e:
            resolve(name)
        assert one_line(e) == f"No checkpoint folder at {name}, and it is not a hub repo id of the form 'owner/name'"


def test_not_a_repo_id():
    for name in ("just-a-name", "a/b/c"):
        with pytest.raises(CheckpointError, match="not a hub repo id of the form 'owner/name'"):
            resolve(name)


def test_a_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file; expected a checkpoint folder"):
        resolve(path)


def test_offline_mode(monkeypatch, empty_cache):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import time by huggingface_hub
    with pytest.raises(CheckpointError) as e:
        resolve(REPO)
    message = one_line(e)
    assert message.startswith(f"Can't load {REPO}: HF_HUB_OFFLINE is set and it is not in the local cache.")
    assert "pass the folder instead" in message


def test_unreachable_hub(monkeypatch, empty_cache):
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # Unreachable even on a machine with network: nothing listens on the discard port.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(CheckpointError) as e:
        Model.from_pretrained(REPO)  # the model loader goes through resolve
    message = one_line(e)
    assert message.startswith(f"Can't load {REPO}: the Hugging Face Hub can't be reached and it is not in the local cache.")
    assert f"hf download {REPO}" in message
