"""The OpenAI-compatible HTTP server (`smolvlm serve`): server.create_app, the engine loop (worker.py), request
validation (protocol.py), input preparation (inputs.py), safe URL fetching (fetch.py) and limits (limits.py).

Nothing heavy is imported here, so `smolvlm --help` doesn't pay for FastAPI."""
