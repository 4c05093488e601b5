"""Fixtures: our processor and the reference's, for each checkpoint family, built once from the real files."""

import pytest

from processing_reference import FOLDERS, reference_processor
from tiny import CHECKPOINT_FILES


def _skip_without_files():
    if not CHECKPOINT_FILES.is_dir():
        pytest.skip(f"the real checkpoint files (tokenizer, configs) are not at {CHECKPOINT_FILES}")


@pytest.fixture(scope="session", params=["v1", "v2"])
def family(request):
    _skip_without_files()
    return request.param


@pytest.fixture(scope="session")
def processors():
    """{"v1": (ours, reference), "v2": (ours, reference)}, built once."""
    _skip_without_files()
    from smolvlm.processing import Processor

    return {f: (Processor.from_pretrained(FOLDERS[f]), reference_processor(f)) for f in FOLDERS}


@pytest.fixture
def pair(processors, family):
    """(ours, reference) for the current family."""
    return processors[family]
