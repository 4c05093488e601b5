"""Parse request bodies without stalling the other requests.

`json.loads` and pydantic's validation hold the interpreter lock for their whole run, even in a worker thread: a
28 MB body of 400,000 small objects takes 0.5 s to parse, during which the event loop relays no token and the engine
loop steps no batch (every running stream waits). So bodies over LARGE_BODY are parsed in a separate process (one,
started on the first such body and kept); what comes back is the parse result, pickled (a validated request keeps
only the fields it knows: its strings are copied back in milliseconds). Small bodies, the common case, are parsed
in the caller's thread pool.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from .protocol import APIError

LARGE_BODY = 256 * 1024  # bytes: a body this big is parsed in the parser process

T = TypeVar("T")
_processes: ProcessPoolExecutor | None = None  # shared by the apps of one server (adapters.py)


async def parse(parser: Callable[[bytes], T], body: bytes, threads: Executor | None = None) -> T:
    """`parser(body)` (a module-level function: it may run in the parser process) off the event loop; its
    exceptions (APIError...) are raised here. `threads`: where small bodies are parsed (None: the loop's default)."""
    global _processes
    loop = asyncio.get_running_loop()
    if len(body) <= LARGE_BODY:
        return await loop.run_in_executor(threads, parser, body)
    if _processes is None:  # spawned: a fork of this threaded process (engine, event loop) isn't safe
        _processes = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), initializer=_end_with,
                                         initargs=(os.getpid(),))
    try:
        return await loop.run_in_executor(_processes, parser, body)
    except BrokenProcessPool:  # the parser process died (killed for memory?): the next large body gets a new one
        _processes = None
        raise APIError("Parsing the request body failed (the parser process ended); try again", 500, None, None,
                       "server_error") from None


def shutdown() -> None:
    """End the parser process, if any (at server shutdown; waits for the parse in progress)."""
    global _processes
    if _processes is not None:
        _processes.shutdown(wait=True, cancel_futures=True)
        _processes = None


def _end_with(parent: int) -> None:
    """In the parser process: exit once the server process is gone (killed: no shutdown() to end this one), which
    its blocked read of the work queue alone would not notice (this process holds that pipe's other end too)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
