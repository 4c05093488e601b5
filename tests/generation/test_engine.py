"""The engine against the reference's greedy generate, against full recomputation, and its request life cycle."""

import threading

import pytest
import torch

from smolvlm.errors import InputError
from smolvlm.generation import SamplingParams
from smolvlm.generation.sampling import Sampler
from tiny import Recorder

N = 20  # new tokens per parity run
GREEDY = SamplingParams(max_new_tokens=N)


def tokens(engine, prompts, params=GREEDY):
    return [r.token_ids for r in engine.generate(prompts, params)]


@pytest.mark.parametrize("family", ["v2", "v1"])
def test_greedy_matches_reference_text_and_images(family, request):
    tiny = request.getfixturevalue(family)
    engine = tiny.engine()
    for prompt in [
        tiny.prompt("Tell me a story about a cat."),
        tiny.prompt("What is in this image?", n_images=1, seed=1),
        tiny.prompt("Compare the three pictures.", n_images=3, seed=2),
    ]:
        ours = tokens(engine, [prompt])[0]
        assert len(ours) > 1
        assert ours == tiny.reference_greedy([prompt], N)[0]


@pytest.mark.parametrize("family", ["v2", "v1"])
def test_batch_matches_reference_left_padded_batch_and_single_runs(family, request):
    tiny = request.getfixturevalue(family)
    prompts = [
        tiny.prompt("Hi"),  # text only, short
        tiny.prompt("Describe both images in detail please.", n_images=2, seed=3),  # longer, two images
        tiny.prompt("And this one?", n_images=1, seed=4),
    ]
    engine = tiny.engine()
    batch = tokens(engine, prompts)
    assert batch == tiny.reference_greedy(prompts, N)
    assert batch == [tokens(engine, [p])[0] for p in prompts]
    assert len({tuple(t) for t in batch}) == 3


@pytest.mark.parametrize("fixture", ["v2", "v2_bf16"])
def test_prompts_of_very_different_lengths_are_prefilled_apart_with_the_same_tokens(fixture, request):
    """Whole prompts prefilled together (a batch job's engine) are right-padded to the longest only while that adds
    little: a 10-image prompt between two short ones runs in its own pass; every row's tokens are its tokens alone."""
    tiny = request.getfixturevalue(fixture)
    prompts = [tiny.prompt("Hi"), tiny.prompt("Describe all of them.", n_images=10, seed=9), tiny.prompt("Ok?")]
    engine = tiny.engine(prefill_chunk=None)
    passes = []
    run_rows = engine._prefill_rows
    engine._prefill_rows = lambda row, chunks, features: passes.append(len(chunks)) or run_rows(row, chunks, features)
    batch = tokens(engine, prompts)
    assert passes == [1, 1, 1]
    assert batch == [tokens(tiny.engine(prefill_chunk=None), [p])[0] for p in prompts]


def test_cached_decoding_gives_full_recomputation_logits_through_joins_and_leaves(v2):
    """Requests join mid-flight, wait for a slot, leave early (compaction): every step's logits of every request
    equal a full forward pass over its prompt + output so far, and its tokens equal generating it alone."""
    engine = v2.engine(max_batch=3)
    engine.sampler = Recorder(engine.max_batch, v2.model.config.text_config.vocab_size, engine.device)
    prompts = {
        "a": (v2.prompt("A long question about the weather today?"), 12),
        "b": (v2.prompt("Two images:", n_images=2, seed=5), 4),  # leaves first: the last row moves into its slot
        "c": (v2.prompt("One image.", n_images=1, seed=6), 8),  # joins at step 3
        "d": (v2.prompt("Queued"), 6),  # joins when a slot frees
    }
    for rid in "ab":
        engine.add_request(prompts[rid][0], SamplingParams(max_new_tokens=prompts[rid][1]), request_id=rid)
    outputs, steps = [], 0
    while engine.has_unfinished() or steps < 3:
        if steps == 2:
            for rid in "cd":
                engine.add_request(prompts[rid][0], SamplingParams(max_new_tokens=prompts[rid][1]), request_id=rid)
        outputs += engine.step()
        steps += 1
    assert len(outputs) == len(engine.sampler.logits) == sum(n for _, n in prompts.values())
    generated = {rid: [] for rid in prompts}
    for out, logits in zip(outputs, engine.sampler.logits):
        prompt = prompts[out.request_id][0]
        ids = torch.cat([prompt.input_ids, torch.tensor(generated[out.request_id], dtype=torch.long)])
        kw = {}
        if prompt.pixel_values is not None:
            kw = dict(pixel_values=prompt.pixel_values[None], pixel_attention_mask=prompt.pixel_attention_mask[None])
        with torch.inference_mode():
            full = v2.model(ids[None], **kw)[0, -1]
        torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
        generated[out.request_id] += out.token_ids
    alone = v2.engine(max_batch=1)
    for rid, (prompt, n) in prompts.items():
        assert generated[rid] == tokens(alone, [prompt], SamplingParams(max_new_tokens=n))[0]


def test_finish_reasons_token_counts_and_end_tokens(v2):
    prompt = v2.prompt("Count to ten.")
    free = v2.engine().generate([prompt], GREEDY)[0]
    assert (free.finish_reason, free.completion_tokens, free.prompt_tokens) == ("length", N, len(prompt))
    assert free.text == v2.tokenizer.decode(free.token_ids, skip_special_tokens=True)
    # a token the model produces at step 6 declared as an end token: it stops there, with that token counted
    end = free.token_ids[5]
    first = free.token_ids.index(end)
    stopped = v2.engine(end_ids=[end]).generate([prompt], GREEDY)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.completion_tokens == first + 1
    assert stopped.text == v2.tokenizer.decode(free.token_ids[:first], skip_special_tokens=True)


def test_stop_strings_cut_the_text_and_stop_generation(v2):
    prompt = v2.prompt("Say something.")
    free = v2.engine().generate([prompt], GREEDY)[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    cut = free.text[: free.text.index(stop)]
    engine = v2.engine()
    engine.add_request(prompt, SamplingParams(max_new_tokens=N, stop=["never appears", stop]))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert "".join(o.text for o in outputs) == cut
    assert outputs[-1].finish_reason == "stop" and all(o.finish_reason is None for o in outputs[:-1])
    assert outputs[-1].completion_tokens < N


def test_the_cache_length_ends_a_request_and_too_long_prompts_are_refused(v2):
    prompt = v2.prompt("x " * 20)
    engine = v2.engine(max_len=len(prompt) + 5)
    result = engine.generate([prompt], GREEDY)[0]
    assert result.finish_reason == "length" and result.completion_tokens == 6  # the last token needs no cache row
    assert result.token_ids == tokens(v2.engine(), [prompt])[0][:6]
    with pytest.raises(InputError, match="prompt has"):
        v2.engine(max_len=len(prompt)).add_request(prompt)


def test_prompts_the_model_cannot_take_are_refused_when_added(v2):
    engine = v2.engine()
    two = v2.prompt("Two images", n_images=2)
    cut = type(two)(two.input_ids[:-30], two.pixel_values, two.pixel_attention_mask)  # truncated into an image
    for bad in [cut, type(two)(two.input_ids, two.pixel_values[:1], two.pixel_attention_mask[:1])]:
        with pytest.raises(InputError, match="image tokens"):
            engine.add_request(bad)
    wide = type(two)(two.input_ids, two.pixel_values[..., :48], two.pixel_attention_mask[..., :48])
    with pytest.raises(InputError, match=r"\[3, 64, 64\]"):
        engine.add_request(wide)
    assert not engine.has_unfinished()


def test_abort_frees_the_slot_and_the_others_continue(v2):
    engine = v2.engine(max_batch=2)
    a, b, c = v2.prompt("first"), v2.prompt("second", n_images=1), v2.prompt("third")
    for rid, prompt in [("a", a), ("b", b), ("c", c), ("d", a)]:  # c and d wait for a slot
        engine.add_request(prompt, GREEDY, request_id=rid)
    got = {rid: [] for rid in "abcd"}
    for i in range(60):
        if i == 3:
            engine.abort("a")  # running
            engine.abort("d")  # still queued
        for out in engine.step():
            got[out.request_id] += out.token_ids
        if not engine.has_unfinished():
            break
    assert len(got["a"]) == 3 and got["d"] == []
    assert got["b"] == tokens(v2.engine(), [b])[0]
    assert got["c"] == tokens(v2.engine(), [c])[0]
    engine.add_request(a, request_id="x")
    with pytest.raises(InputError, match="already in use"):
        engine.add_request(a, request_id="x")


def test_a_batch_with_one_bad_prompt_queues_nothing(v2):
    engine = v2.engine(max_len=64)
    bad = v2.prompt("too many tokens " * 40)
    with pytest.raises(InputError, match="prompt has"):
        engine.generate([v2.prompt("fine"), bad])
    with pytest.raises(InputError, match="2 sampling parameters for 1"):
        engine.generate([bad], [GREEDY, GREEDY])
    assert not engine.has_unfinished()


def test_requests_added_from_another_thread(v2):
    engine = v2.engine(max_batch=2)
    prompts = [v2.prompt(f"question number {i}") for i in range(4)]
    params = SamplingParams(max_new_tokens=6)
    added = threading.Event()

    def client():
        for p in prompts:
            engine.add_request(p, params)
        added.set()

    thread = threading.Thread(target=client)
    thread.start()
    got: dict[str, list[int]] = {}
    while not (added.is_set() and not engine.has_unfinished()):
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
    thread.join()
    assert [got[str(i)] for i in range(4)] == tokens(v2.engine(), prompts, params)


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(v2):
    prompt, other = v2.prompt("Write a poem."), v2.prompt("Another request", n_images=1)
    seeded = SamplingParams(max_new_tokens=N, temperature=1.0, top_p=0.95, seed=42)
    first = v2.engine().generate([prompt], seeded)[0].token_ids
    assert v2.engine().generate([prompt], seeded)[0].token_ids == first
    mixed = v2.engine().generate([other, prompt], [SamplingParams(max_new_tokens=5, temperature=0.7), seeded])
    assert mixed[1].token_ids == first
    reseeded = SamplingParams(max_new_tokens=N, temperature=1.0, top_p=0.95, seed=43)
    assert v2.engine().generate([prompt], reseeded)[0].token_ids != first
    assert first != tokens(v2.engine(), [prompt])[0]  # it really sampled


class Forced(Sampler):
    """Makes every row produce the given tokens in turn, whatever the logits (to test the text machinery)."""

    script: list[int] = []

    def __call__(self, logits, start=0):
        self.calls = getattr(self, "calls", 0) + 1
        return torch.full((logits.shape[0],), self.script[min(self.calls, len(self.script)) - 1])


@pytest.mark.parametrize("stop", [(), ("你好",)])
def test_streamed_text_of_multibyte_tokens(v2, stop):
    text = "Hi 😀 there, 你好世界 👩‍👩‍👧 ok"
    script = v2.tokenizer.encode(text, add_special_tokens=False).ids + v2.end_ids[:1]
    engine = v2.engine()
    engine.sampler = Forced(engine.max_batch, v2.model.config.text_config.vocab_size, engine.device)
    engine.sampler.script = script
    for i in range(2):
        engine.add_request(v2.prompt(f"prompt {i}", n_images=i), SamplingParams(max_new_tokens=50, stop=stop))
    pieces = {"0": [], "1": []}
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            pieces[out.request_id].append(out.text)
            if out.finished:
                finals[out.request_id] = out
    expected = text[: text.index(stop[0])] if stop else text
    for rid in pieces:
        assert "".join(pieces[rid]) == expected
        assert not any("\ufffd" in p for p in pieces[rid])
        assert sum(1 for p in pieces[rid] if p) > 3
        assert finals[rid].finish_reason == "stop"
        if stop:  # the stop string ends generation as soon as it is complete
            assert finals[rid].completion_tokens < len(script) - 3
        else:
            assert finals[rid].completion_tokens == len(script)


@pytest.mark.parametrize("options, named", [({"prefill_chunk": 0}, "prefill_chunk=0"),
                                            ({"vision_layers": 0}, "vision_layers=0"),
                                            ({"vision_layers": 2.5}, "vision_layers=2.5")])
def test_bad_chunk_budgets_are_refused_by_name(v2, options, named):
    with pytest.raises(InputError, match=named):
        v2.engine(**options)
