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


@pytest.fixture
def image_server():
    """A local HTTP server: `serve({"/path": bytes})` adds routes and returns the base URL; other paths are 404.
    A number instead of bytes: the server waits that many seconds before answering (to test timeouts)."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    routes = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = routes.get(self.path)
            if isinstance(body, (int, float)):
                time.sleep(body)
                body = b""
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def serve(new_routes: dict) -> str:
        routes.update(new_routes)
        return f"http://127.0.0.1:{server.server_port}"

    yield serve
    server.shutdown()
    server.server_close()
    thread.join()
