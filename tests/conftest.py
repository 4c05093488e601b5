import pytest
import torch

from tiny import CHECKPOINT_FILES, make_tiny_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_v2(tmp_path_factory):
    """A tiny random SmolVLM2 (`model_type: smolvlm`) checkpoint folder, fp32, saved by the reference."""
    if not CHECKPOINT_FILES.is_dir():
        pytest.skip(f"the real checkpoint files (tokenizer, configs) are not at {CHECKPOINT_FILES}")
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_v2"), "smolvlm")


@pytest.fixture(scope="session")
def tiny_v1(tmp_path_factory):
    """A tiny random SmolVLM v1 (`model_type: idefics3`) checkpoint folder, fp32, saved by the reference."""
    if not CHECKPOINT_FILES.is_dir():
        pytest.skip(f"the real checkpoint files (tokenizer, configs) are not at {CHECKPOINT_FILES}")
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_v1"), "idefics3", seed=1)
