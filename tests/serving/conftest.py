"""The shared server over the tiny checkpoint (started once for this folder) and the Python API on the same model."""

import pytest

from server_process import (CONTEXT, MAX_BODY_MB, MAX_IMAGE_PIXELS, MAX_IMAGES, MAX_TOKENS, MAX_VIDEO_SECONDS,
                            Server)


@pytest.fixture(scope="package")
def server(tiny_v2, tmp_path_factory):
    """One server for the tests of this folder (started once: it takes seconds)."""
    server = Server(
        tiny_v2, tmp_path_factory.mktemp("server") / "server.log",
        "--max-batch", "16", "--max-model-len", str(CONTEXT), "--max-tokens", str(MAX_TOKENS),
        "--max-images", str(MAX_IMAGES), "--max-image-pixels", str(MAX_IMAGE_PIXELS),
        "--max-video-seconds", str(MAX_VIDEO_SECONDS), "--max-body-mb", str(MAX_BODY_MB),
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="package")
def vlm(tiny_v2):
    import smolvlm.api

    return smolvlm.api.load(tiny_v2, progress=False)


@pytest.fixture(scope="package")
def client(server):
    """The official openai client, pointed at the shared server."""
    return server.openai()
