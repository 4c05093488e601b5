"""The batch loop: requests stream from the input through preparation workers into one continuously batched engine.

    input lines --> [worker processes: validate, read + decode + resize media, template, tokenize] --> bounded window
                --> Engine (continuous batching: a finished row's slot is refilled at the next step) --> result lines

Each request goes the server's way (serving/protocol.parse_request, inputs.build_prompt, inputs.sampling_params), so it
is validated and limited exactly as `smolvlm serve` would; a request that fails anywhere becomes an error line and
the job goes on. At most `window` requests are prepared and not yet running (prepared pixels are the big objects),
so memory stays flat however long the input is. The loop blocks on the workers only when the engine has nothing to
run; that time is reported as the engine's wait for input.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import multiprocessing
import os
import resource
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import InputError, SmolVLMError
from ..generation import Engine, Prompt, SamplingParams
from ..processing import Processor
from ..serving import protocol
from ..serving.fetch import Fetcher
from ..serving.inputs import build_prompt, fetch_media, sampling_params
from ..serving.limits import Limits
from ..serving.protocol import APIError, ChatCompletionRequest
from ..serving.structured import calls_tools, grammar, tool_calls
from .files import Item, error_line, success_line
from .journal import Journal


@dataclass
class Prepared:
    """A request ready for the engine."""

    item: Item
    chat: ChatCompletionRequest
    prompt: Prompt
    params: SamplingParams
    worker_rss: int = 0  # peak RSS (kB) of the worker process that prepared it


@dataclass
class Failed:
    """A request that can't run, and why (the server's error for it)."""

    item: Item
    error: APIError
    worker_rss: int = 0


class Preparer:
    """Turns Items into Prepared requests (or APIErrors), as the server does; one per worker process or thread."""

    def __init__(self, processor: Processor, limits: Limits, context: int, options: dict | None = None):
        self.processor = with_options(processor, options or {})
        self.limits, self.context = limits, context
        self.loop = asyncio.new_event_loop()  # fetches run on it, one request at a time
        self.fetcher = Fetcher(limits)

    def __call__(self, item: Item) -> Prepared | Failed:
        if item.error is not None:
            return Failed(item, item.error)
        try:
            chat = protocol.parse_request(item.body)
            grammar(chat)  # a malformed constraint: the server's 400
            media = self.loop.run_until_complete(fetch_media(chat, self.fetcher, self.limits))
            prompt = build_prompt(self.processor, chat, media, self.limits)
            return Prepared(item, chat, prompt, sampling_params(chat, len(prompt), self.context, self.limits))
        except APIError as e:
            return Failed(item, e)
        except SmolVLMError as e:
            return Failed(item, APIError(str(e), 400))
        except Exception as e:  # a bug, or a decoder failing in a way we don't know: this item fails, not the job
            return Failed(item, APIError(f"Internal error preparing the request ({type(e).__name__}: {e})", 500, None,
                                         None, "server_error"))


def with_options(processor: Processor, options: dict) -> Processor:
    """The processor with job-wide settings: do_image_splitting, fps, max_frames (None keeps the checkpoint's)."""
    options = {k: v for k, v in options.items() if v is not None}
    if not options:
        return processor
    processor = copy.copy(processor)
    if "do_image_splitting" in options:
        processor.image_processor = processor.image_processor.with_overrides(
            do_image_splitting=options["do_image_splitting"])
    sampling = {k: options[k] for k in ("fps", "max_frames") if k in options}
    if sampling:
        processor.video_sampling = dataclasses.replace(processor.video_sampling, **sampling).checked("video sampling")
    return processor


_worker: Preparer | None = None  # the Preparer of a worker process


def _start_worker(processor: Processor, limits: Limits, context: int, options: dict) -> None:
    global _worker
    torch.set_num_threads(1)  # a worker decodes one image at a time; the engine's process has the cores
    # ...and the first claim on them: a worker preempting one of the engine's threads stalls the other at the next
    # barrier too (run-batch on 20 tiled photos, 2 cores: 17.8 -> 18.6-19.2 images/min), while a niced worker still
    # keeps ahead of the engine ("engine waited for input" in the summary says when it doesn't)
    if hasattr(os, "nice"):
        os.nice(10)
    _worker = Preparer(processor, limits, context, options)


def _prepare_in_worker(item: Item) -> Prepared | Failed:
    ready = _worker(item)
    ready.worker_rss = peak_rss_kb()
    return ready


def peak_rss_kb() -> int:
    """This process's peak resident memory. /proc's VmHWM is this process image's own; getrusage's ru_maxrss keeps
    the parent's peak across fork and exec (a spawned worker would report the engine process's)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def batch_engine(vlm, max_batch: int, max_len: int) -> Engine:
    """The engine of a batch job (local or a Ray actor). An offline job wants throughput, not short gaps between a
    stream's tokens, so prefill is not chunked: the requests admitted in a step are prefilled whole, together, with
    their frames encoded in batches (4 at a time on a CPU) rather than one encoder slice per step (16 one-tile photos
    on 2 AMX cores: 1.1x -> 1.6x the reference's images per minute). Tokens are the same either way."""
    return Engine(vlm.model, vlm.processor, vlm.end_ids, max_batch=max_batch, max_len=max_len, prefill_chunk=None)


class Answers:
    """Books a batch's requests on an Engine and turns finished ones into result lines."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.live: dict[str, tuple[Prepared, list[str]]] = {}  # request id -> (request, text pieces)
        self.tokens = 0  # generated
        self.rows = 0  # rows decoded, summed over steps (with steps: how full the batch was)
        self.steps = 0
        self.worker_rss = 0  # peak RSS of the preparing worker processes (kB)

    def add(self, ready: Prepared | Failed) -> tuple[Item, dict] | None:
        """Queue a prepared request; (item, its error line) instead if it can't run."""
        self.worker_rss = max(self.worker_rss, ready.worker_rss)
        if isinstance(ready, Failed):
            return ready.item, error_line(ready.item.custom_id, ready.item.line, ready.error)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            self.engine.add_request(ready.prompt, ready.params, request_id)
        except InputError as e:  # e.g. a constraint that doesn't compile
            return ready.item, error_line(ready.item.custom_id, ready.item.line, APIError(str(e), 400))
        self.live[request_id] = (ready, [])
        return None

    def step(self) -> list[tuple[Item, dict]]:
        """One engine step; (item, result line) of the requests it finished."""
        self.rows += len(self.engine.running)
        self.steps += bool(self.engine.running)
        records = []
        for out in self.engine.step():
            ready, pieces = self.live[out.request_id]
            pieces.append(out.text)
            self.tokens += len(out.token_ids)
            if out.finished:
                del self.live[out.request_id]
                text = "".join(pieces)
                tools = calls_tools(ready.chat) and out.finish_reason == "stop"
                calls = tool_calls(ready.chat, text) if tools else None
                body = protocol.completion(out.request_id, self.model_name, text, out.finish_reason, out.prompt_tokens,
                                           out.completion_tokens, calls)
                records.append((ready.item, success_line(ready.item.custom_id, body)))
        return records


@dataclass
class Summary:
    done: int = 0  # items answered by this run (errors included)
    failed: int = 0  # of those, errors
    skipped: int = 0  # already in the output from an earlier run
    duplicates: int = 0  # custom_ids seen before in this input (not run again)
    tokens: int = 0
    seconds: float = 0.0
    input_wait_s: float = 0.0  # the engine had nothing to run while workers prepared inputs
    batch_fill: float = 0.0  # mean rows per decode step / max_batch
    peak_rss_mb: float = 0.0  # this process
    peak_worker_rss_mb: float = 0.0  # the largest worker process

    def lines(self) -> str:
        rate = self.done / self.seconds * 60 if self.seconds else 0.0
        wait_share = self.input_wait_s / self.seconds if self.seconds else 0.0
        out = (f"{self.done} items ({self.done - self.failed} ok, {self.failed} failed) in {self.seconds:.1f} s: "
               f"{rate:.1f} items/min, {self.tokens / max(self.seconds, 1e-9):.1f} generated tok/s; engine waited "
               f"for input {wait_share:.0%} of the time, batch {self.batch_fill:.0%} full; peak RSS "
               f"{self.peak_rss_mb:.0f} MB (workers {self.peak_worker_rss_mb:.0f} MB)")
        if self.skipped:
            out += f"\n{self.skipped} items were already done by an earlier run (skipped)"
        if self.duplicates:
            out += f"\n{self.duplicates} lines repeat an earlier custom_id and were not run"
        return out


def answer_stream(answers: Answers, items: Iterator[Item], submit: Callable, window: int,
                  clock: Summary | None = None) -> Iterator[list[tuple[Item, dict]]]:
    """(item, result line) for each of `items` (a list per engine step), prepared by `submit(item) -> Future` at
    most `window` ahead of the engine: prepared requests not yet in a batch slot, plus those being prepared, never
    exceed it."""
    engine, pending, exhausted = answers.engine, set(), False
    while True:
        while not exhausted and len(pending) + len(engine.waiting) < window:
            item = next(items, None)
            if item is None:
                exhausted = True
            else:
                pending.add(submit(item))
        if not pending and not engine.has_unfinished():
            return
        idle = not engine.has_unfinished()
        start = time.perf_counter()
        ready, pending = wait(pending, timeout=None if idle else 0, return_when=FIRST_COMPLETED)
        if idle and clock is not None:
            clock.input_wait_s += time.perf_counter() - start
        records = [r for r in (answers.add(f.result()) for f in ready) if r is not None]
        if engine.has_unfinished():
            records += answers.step()
        yield records


def run(vlm, items: Iterator[Item], journal: Journal, *, model_name: str, limits: Limits, context: int,
        max_batch: int, workers: int, options: dict, total: int | None = None, progress: bool = True) -> Summary:
    """Answer every item not yet in the journal, appending its line as it finishes."""
    summary = Summary()
    seen: set[str] = set()

    def todo() -> Iterator[Item]:
        for item in items:
            if item.key in journal.done and item.key not in seen:
                summary.skipped += 1
            elif item.key in seen:
                summary.duplicates += 1
                print(f"smolvlm: line {item.line}: custom_id {item.custom_id!r} repeats an earlier line's; not run "
                      "again", file=sys.stderr)
            else:
                yield item
            seen.add(item.key)

    engine = batch_engine(vlm, max_batch, context)
    answers = Answers(engine, model_name)
    context_spawn = multiprocessing.get_context("spawn")  # fork would copy the engine's threads and memory
    pool = ProcessPoolExecutor(workers, mp_context=context_spawn, initializer=_start_worker,
                               initargs=(vlm.processor, limits, engine.max_len, options))
    bar = tqdm(total=total, initial=len(journal.done), unit="item", file=sys.stderr, dynamic_ncols=True,
               disable=None if progress else True, desc="run-batch", smoothing=0.05)
    start = time.perf_counter()
    try:
        with bar:
            for finished in answer_stream(answers, todo(), lambda item: pool.submit(_prepare_in_worker, item),
                                          max_batch + 2 * workers, summary):
                records = [record for _, record in finished]
                journal.write(records)
                summary.done += len(records)
                summary.failed += sum(r["error"] is not None for r in records)
                if records:
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(f"{answers.tokens / elapsed:.1f} tok/s, {summary.failed} failed",
                                        refresh=False)
                    bar.update(len(records))
    except BrokenProcessPool:
        raise SmolVLMError("A worker process preparing inputs died (killed, out of memory, or crashed decoding a "
                           f"file); the finished items are saved in {journal.path}: run the same command again to "
                           "resume") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    summary.seconds = time.perf_counter() - start
    summary.tokens = answers.tokens
    summary.batch_fill = answers.rows / max(answers.steps, 1) / max_batch
    summary.peak_rss_mb = peak_rss_kb() / 1024
    summary.peak_worker_rss_mb = answers.worker_rss / 1024
    return summary
