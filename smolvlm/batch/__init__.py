"""Offline batch jobs: `smolvlm run-batch` (files.py formats, journal.py resuming, runner.py the loop) and Ray Data
(ray.py: one engine per actor)."""
