"""The engine loop thread, in process: outputs reach their sinks, aborts free slots, a failing step fails only the
requests in it, and stop() ends the loop."""

from __future__ import annotations

import queue

import pytest

from smolvlm.generation import Engine, SamplingParams, prepare
from smolvlm.serving.worker import Worker

TIMEOUT = 30


@pytest.fixture
def worker(vlm):
    worker = Worker(lambda: Engine(vlm.model, vlm.processor, vlm.end_ids, max_batch=4, max_len=256))
    worker.start()
    yield worker
    worker.stop()


def submit(worker, vlm, request_id: str, text: str, n: int) -> queue.Queue:
    sink = queue.Queue()
    prompt = prepare(vlm.processor, [{"role": "user", "content": text}])
    worker.submit(request_id, prompt, SamplingParams(max_new_tokens=n), sink.put)
    return sink


def drain(sink: queue.Queue) -> list:
    items = [sink.get(timeout=TIMEOUT)]
    while not isinstance(items[-1], Exception) and not items[-1].finished:
        items.append(sink.get(timeout=TIMEOUT))
    return items


def test_outputs_reach_their_sinks(worker, vlm):
    sinks = {f"r{i}": submit(worker, vlm, f"r{i}", f"Count to {i}", 5 + i) for i in range(6)}  # more than 4 slots
    for i, (request_id, sink) in enumerate(sinks.items()):
        outputs = drain(sink)
        assert {o.request_id for o in outputs} == {request_id}
        expected = vlm.complete([{"role": "user", "content": f"Count to {i}"}], max_new_tokens=5 + i)
        assert "".join(o.text for o in outputs) == expected.text
        assert [t for o in outputs for t in o.token_ids] == expected.token_ids
    metrics = worker.snapshot()
    assert metrics["finished"] == 6 and metrics["max_decode_batch"] == 4 and metrics["shared_steps"] > 0


def test_abort_frees_the_slot_and_silences_the_sink(worker, vlm):
    sink = submit(worker, vlm, "long", "Tell me a story", 200)
    first = sink.get(timeout=TIMEOUT)
    assert first.request_id == "long" and not first.finished
    worker.abort("long")
    other = drain(submit(worker, vlm, "next", "Hi", 3))  # a step after the abort has run once this finishes
    assert other[-1].finished
    assert worker.snapshot()["running"] == 0
    assert worker.engine.running == [] and not worker.engine.has_unfinished()
    leftovers = []
    while not sink.empty():
        leftovers.append(sink.get())
    assert not any(o.finished for o in leftovers)  # it never ran to the end


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(worker, vlm):
    engine = worker.engine
    original = engine.step

    def step():
        if len(engine.running) == 2:  # both requests are decoding
            raise RuntimeError("out of memory (simulated)")
        return original()

    engine.step = step
    sinks = [submit(worker, vlm, f"r{i}", "Tell me a story", 50) for i in range(2)]
    for sink in sinks:
        error = drain(sink)[-1]
        assert isinstance(error, RuntimeError) and "simulated" in str(error)
    assert worker.engine is not engine  # a fresh engine (and KV cache) replaced the failed one
    outputs = drain(submit(worker, vlm, "after", "Hi", 4))
    assert "".join(o.text for o in outputs) == vlm.generate([{"role": "user", "content": "Hi"}], max_new_tokens=4)
    assert worker.alive


def test_stop_ends_the_loop_and_refuses_new_requests(worker, vlm):
    sink = submit(worker, vlm, "long", "Tell me a story", 200)
    sink.get(timeout=TIMEOUT)
    worker.stop()
    assert not worker.thread.is_alive() and not worker.alive
    assert not worker.engine.has_unfinished()
    with pytest.raises(RuntimeError, match="not running"):
        submit(worker, vlm, "late", "Hi", 2)


@pytest.mark.parametrize("where", ["detokenizer", "sampler"])
def test_a_request_failing_inside_a_shared_step_fails_alone(worker, vlm, monkeypatch, where):
    """A failure injected into one request's own work in a step shared with others (its detokenizer while decoding,
    or its sampler settings at admission): that request ends with an error, the others get their normal answers."""
    from smolvlm.generation.detokenizer import Detokenizer
    from smolvlm.generation.sampling import Sampler

    if where == "detokenizer":
        add = Detokenizer.add

        def faulty_add(self, token_id):
            if "BOOM" in self.stops.stop and len(self.token_ids) == 3:
                raise ValueError("injected failure")
            return add(self, token_id)

        monkeypatch.setattr(Detokenizer, "add", faulty_add)
    else:
        set_ = Sampler.set

        def faulty_set(self, slot, params, prompt_ids):
            if "BOOM" in params.stop:
                raise OverflowError("injected failure")
            return set_(self, slot, params, prompt_ids)

        monkeypatch.setattr(Sampler, "set", faulty_set)
    texts = [f"Tell me about {w}" for w in ("cats", "dogs", "the sea")]
    solo = [vlm.generate([{"role": "user", "content": t}], max_new_tokens=12) for t in texts]
    sinks = {}
    for i, text in enumerate(texts[:2] + ["Hi"] + texts[2:]):  # the faulty one joins the same prefill as the others
        prompt = prepare(vlm.processor, [{"role": "user", "content": text}])
        params = SamplingParams(max_new_tokens=12, stop=("BOOM",) if text == "Hi" else ())
        sinks[text] = queue.Queue()
        worker.submit(f"r{i}", prompt, params, sinks[text].put)
    failed = drain(sinks.pop("Hi"))
    assert failed[-1].finish_reason == "error" and "injected failure" in failed[-1].error
    assert ["".join(o.text for o in drain(sinks[t])) for t in texts] == solo
    assert worker.alive and worker.metrics.running == 0
