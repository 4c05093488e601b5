"""Defaults that the command line shows in its help: a module without torch, so `smolvlm --help` stays fast."""

DEFAULT_CACHE_MB = 256  # image-feature + KV prefix caches of a SmolVLM (generation/caches.py)
