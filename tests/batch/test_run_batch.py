"""`smolvlm run-batch` end to end: bad items become error lines, kill -9 at random points then resume gives every id
exactly once with the uninterrupted run's answers, the OpenAI Batch format read back with the official openai types,
the images + prompt short form with Parquet output."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from batch_jobs import answers, popen_batch, results, run_batch
from openai.types import BatchError
from openai.types.chat import ChatCompletion
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming
from pydantic import TypeAdapter

from smolvlm.batch.journal import Journal

FAILURES = 8  # 5 bad requests, a line that is not JSON, one without custom_id, one repeating a custom_id


def test_bad_items_become_error_lines_and_the_job_goes_on(clean_run, requests_file):
    done, records = clean_run
    _, good, bad = requests_file
    assert done.returncode == FAILURES, done.stderr
    assert "19 items (12 ok, 7 failed)" in done.stderr and "1 lines repeat an earlier custom_id" in done.stderr
    by_id = answers(records)
    assert len(records) == len(by_id) == len(good) + len(bad) + 2  # every id once, the repeated one too
    assert all(by_id[i] for i in good)
    for custom_id, named in bad.items():
        record = next(r for r in records if r["custom_id"] == custom_id)
        assert record["response"]["status_code"] == 400 and named in record["error"]["message"], record
    assert by_id["line:18"] is None and by_id["line:19"] is None  # not JSON; no custom_id
    assert "Write about the number 0" not in json.dumps(records)  # (prompts are not echoed)


def test_openai_batch_format_round_trip(clean_run, requests_file):
    """Input bodies are valid openai request params; every output line parses with openai's own models."""
    adapter = TypeAdapter(CompletionCreateParamsNonStreaming)
    for raw in requests_file[0].read_text().splitlines()[:4]:
        adapter.validate_python(json.loads(raw)["body"])
    _, records = clean_run
    for record in records:
        assert set(record) == {"id", "custom_id", "response", "error"}
        if record["error"] is None:
            completion = ChatCompletion.model_validate(record["response"]["body"])
            assert completion.choices[0].message.content and completion.usage.completion_tokens > 0
            assert record["response"]["request_id"] == completion.id
        else:
            error = BatchError.model_validate(record["error"])
            assert error.message and error.line >= 1
            assert record["response"]["body"]["error"]["message"] == error.message


def test_killed_at_random_points_then_resumed_gives_every_id_once(tiny_v2, requests_file, clean_run, tmp_path):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    out = tmp_path / "results.jsonl"
    expected = answers(clean_run[1])
    kills = 0
    for attempt in range(6):
        done = len(results_but_torn(out))
        if done == len(expected):  # the last kill landed after the last line: nothing left to interrupt
            break
        process = popen_batch(tiny_v2, "-i", str(requests_file[0]), "-o", str(out))
        # kill once the output holds `target` lines; target == done: during start-up (model loading takes seconds).
        # Targets stay in the first half of what is left, so several kills land before the job can finish.
        target = rng.randrange(done, done + max(1, (len(expected) - done) // 2))
        deadline = time.monotonic() + (rng.uniform(0.3, 2) if target == done else 120)
        while process.poll() is None and time.monotonic() < deadline:
            if target > done and out.exists() and out.read_bytes().count(b"\n") >= target:
                break
            time.sleep(0.005)
        if process.poll() is not None:
            break
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        kills += 1
        keys = list(answers(results_but_torn(out)))
        assert len(keys) == len(set(keys)), f"seed {seed}: a duplicated id after kill {kills}"
    final = run_batch(tiny_v2, "-i", str(requests_file[0]), "-o", str(out))
    assert final.returncode == FAILURES, final.stderr
    assert kills >= 3, f"seed {seed}: only {kills} kills landed before the job finished"
    assert out.read_bytes().endswith(b"\n")
    records = results(out)
    assert len(records) == len(expected) and answers(records) == expected, f"seed {seed}"


def results_but_torn(path):
    """The complete lines of a killed job's output (a torn last line is what resuming drops)."""
    if not path.exists():
        return []
    return [json.loads(raw) for raw in path.read_bytes().split(b"\n")[:-1]]


def test_the_journal_drops_a_torn_line_and_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "out.jsonl"
    journal = Journal(path)
    ok = {"id": "1", "custom_id": "a", "response": {"status_code": 200, "body": {}}, "error": None}
    failed = {"id": "2", "custom_id": None, "response": {"status_code": 400, "body": {}},
              "error": {"code": "x", "message": "m", "param": None, "line": 7}}
    journal.write([ok, failed])
    journal.close()
    with open(path, "ab") as f:
        f.write(b'{"id": "3", "custom_id": "b", "resp')  # a kill in the middle of a write
    journal = Journal(path)
    assert journal.done == {"a", "line:7"} and journal.failed == 1
    journal.write([{**ok, "custom_id": "b"}])
    journal.close()
    assert [r["custom_id"] for r in results(path)] == ["a", None, "b"]
    path.write_text("some other file\n")
    with pytest.raises(Exception, match="not a result line"):
        Journal(path)


def test_images_and_a_prompt_to_parquet_and_resume(tiny_v2, photos, tmp_path):
    out = tmp_path / "captions.parquet"
    args = ["--images", str(photos), str(photos / "nothing-here.jpg"), "--prompt", "Describe this image.",
            "--max-new-tokens", "6", "-o", str(out)]
    done = run_batch(tiny_v2, *args)
    assert done.returncode == 3, done.stderr  # corrupt.png, big.png, nothing-here.jpg
    table = pq.read_table(out).to_pylist()
    assert len(table) == 9 and {os.path.basename(r["custom_id"]) for r in table} >= {"p0.png", "nothing-here.jpg"}
    failed = {os.path.basename(r["custom_id"]) for r in table if r["error"]}
    assert failed == {"corrupt.png", "big.png", "nothing-here.jpg"}
    assert all(r["text"] and r["completion_tokens"] <= 6 and r["status_code"] == 200 for r in table if not r["error"])
    again = run_batch(tiny_v2, *args)  # everything is done: nothing runs, same file, same exit code
    assert again.returncode == 3 and "9 items were already done" in again.stderr
    assert pq.read_table(out).to_pylist() == table
    refused = run_batch(tiny_v2, "-i", str(out), "--prompt", "x", "-o", str(tmp_path / "x.jsonl"))
    assert refused.returncode == 1 and "--prompt: only for --images" in refused.stderr


def test_one_job_per_output_file(tmp_path):
    first = Journal(tmp_path / "out.jsonl")
    with pytest.raises(Exception, match="another job is writing"):
        Journal(tmp_path / "out.jsonl")
    first.close()
    Journal(tmp_path / "out.jsonl").close()


def test_a_batch_jobs_engine_prefills_whole_prompts_with_the_same_tokens(tiny_v2, photos):
    """The batch engine doesn't chunk prefill: a request admitted while others decode has its frames encoded whole
    (no vision slices carried over steps), and every request gets the tokens the interactive engine gives it."""
    from PIL import Image

    import smolvlm
    from smolvlm.batch.runner import batch_engine
    from smolvlm.generation import Engine, SamplingParams

    vlm = smolvlm.load(tiny_v2)
    convs = [[{"role": "user", "content": [{"type": "image", "image": Image.open(photos / f"p{i}.png")},
                                           {"type": "text", "text": f"Describe picture {i}."}]}] for i in range(4)]
    params = [SamplingParams(max_new_tokens=n) for n in (2, 9, 3, 7)]  # rows finish apart: admission mid-decode
    interactive = Engine(vlm.model, vlm.processor, vlm.end_ids, max_batch=2, max_len=512)
    batch = batch_engine(vlm, 2, 512)
    sliced = {}  # engine -> encoder layers run in slices carried over steps

    def counting(engine, name):
        run = engine.vision.run

        def counted(prefilling, layers):
            done = run(prefilling, layers)
            sliced[name] = sliced.get(name, 0) + done
            return done
        engine.vision.run = counted

    counting(interactive, "interactive"), counting(batch, "batch")
    expected = [r.token_ids for r in interactive.generate(convs, params)]
    assert [r.token_ids for r in batch.generate(convs, params)] == expected
    assert sliced["interactive"] > 0 and sliced["batch"] == 0


def test_preparation_workers_yield_the_cores_to_the_engine():
    """A worker runs at a lower priority (nice +10) than the engine's process it feeds."""
    code = ("import os; from smolvlm.batch.runner import _start_worker; from smolvlm.serving.limits import Limits; "
            "before = os.nice(0); _start_worker(None, Limits(), 2048, {}); print(os.nice(0) - before)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "10"
