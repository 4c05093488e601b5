"""Prefix cache, image-feature cache and chunked prefill: with them, every greedy output is token for token the output
without them (fp32 and bf16 with the C++ kernels, text, images, many frames, mixed batches, forced eviction); logits
after a cached prefix equal a full forward pass; images are part of a prefix's identity."""

import pytest
import torch

from smolvlm.generation import Caches, Prompt, SamplingParams
from smolvlm.generation.prefix_cache import BLOCK
from tiny import Recorder

N = 12
GREEDY = SamplingParams(max_new_tokens=N)


@pytest.fixture(params=["v2", "v2_bf16"])
def tiny(request):
    """The tiny checkpoint in fp32, and in bf16 fused (the C++ prefill and decode kernels where they run)."""
    return request.getfixturevalue(request.param)


def turn(tiny, prompt: Prompt, answer: list[int], text: str) -> Prompt:
    """The next turn of a chat: the prompt, the answer and a new user message, with the same images."""
    more = tiny.tokenizer.encode(f"\nUser:{text}<end_of_utterance>\nAssistant:", add_special_tokens=False).ids
    ids = torch.cat([prompt.input_ids, torch.tensor(answer + more)])
    return Prompt(ids, prompt.pixel_values, prompt.pixel_attention_mask)


def results(engine, prompts, params=GREEDY):
    return engine.generate(prompts, params)


def test_chat_turns_reuse_the_conversation_and_answer_as_without_caches(tiny):
    caches = Caches(64)
    cached, plain = tiny.engine(caches=caches), tiny.engine()
    prompt = tiny.prompt("What is in these pictures?", n_images=3, seed=1)
    for i, question in enumerate(["And the colours?", "Say it again in one word."]):
        with_cache, without = results(cached, [prompt])[0], results(plain, [prompt])[0]
        assert with_cache.token_ids == without.token_ids
        if i:  # the earlier turn's prompt and answer, to its last whole block
            assert with_cache.cached_tokens == (previous - 1) // BLOCK * BLOCK > 0
        previous = len(prompt) + len(with_cache.token_ids)
        prompt = turn(tiny, prompt, with_cache.token_ids, question)
    assert caches.features.misses == 3 and caches.features.hits == 0  # later turns' frames lie in the cached prefix
    assert 0 < caches.prefix.reused <= caches.prefix.queried


def test_one_batch_of_questions_about_one_image_encodes_and_prefills_it_once(tiny):
    caches = Caches(64)
    g = torch.Generator().manual_seed(3)
    pixels = torch.rand(8, 3, 64, 64, generator=g) * 2 - 1  # 8 frames: 8 x 19 tokens, several blocks
    questions = ["Describe it.", "How many cats?", "What colour?", "Is it day?", "Where?"]
    prompts = [tiny.prompt(q, pixels=pixels) for q in questions] + [tiny.prompt("Unrelated text")]
    ours = results(tiny.engine(max_batch=8, caches=caches), prompts)
    assert [r.token_ids for r in ours] == [r.token_ids for r in results(tiny.engine(max_batch=8), prompts)]
    assert caches.features.misses == 8  # the 8 distinct frames, once
    assert ours[0].cached_tokens == 0 and all(r.cached_tokens >= 4 * BLOCK for r in ours[1:5])
    assert ours[5].cached_tokens == 0


def test_same_tokens_with_other_images_do_not_hit(tiny):
    caches = Caches(64)
    engine, plain = tiny.engine(caches=caches), tiny.engine()
    first = tiny.prompt("What is this?", n_images=3, seed=1)
    other = tiny.prompt("What is this?", n_images=3, seed=2)  # the same token ids, other pixels
    assert torch.equal(first.input_ids, other.input_ids)
    results(engine, [first])
    again = results(engine, [other])[0]
    first_image = int((other.input_ids == tiny.model.config.image_token_id).nonzero()[0])
    assert again.cached_tokens == first_image // BLOCK * BLOCK  # only the text before the first image
    assert again.token_ids == results(plain, [other])[0].token_ids
    assert caches.features.misses == 6 and caches.features.hits == 0
    # one pixel changed (a file edited in place): that frame misses, the prefix stops before it
    edited = other.pixel_values.clone()
    edited[2, 0, 5, 5] += 0.5
    third = results(engine, [Prompt(other.input_ids, edited, other.pixel_attention_mask)])[0]
    image_positions = (other.input_ids == tiny.model.config.image_token_id).nonzero()[:, 0].view(3, -1)  # [3, N]
    assert first_image // BLOCK * BLOCK < third.cached_tokens <= int(image_positions[2, 0]) // BLOCK * BLOCK
    assert third.token_ids == results(plain, [Prompt(other.input_ids, edited, other.pixel_attention_mask)])[0].token_ids
    # frames 0 and 1 come from the feature cache where the cached prefix doesn't cover them; frame 2 is encoded
    beyond = int((image_positions[:2, -1] >= third.cached_tokens).sum())
    assert caches.features.misses == 7 and caches.features.hits == beyond


def test_same_image_with_other_text_after_it(tiny):
    caches = Caches(64)
    engine, plain = tiny.engine(caches=caches), tiny.engine()
    a = tiny.prompt("Describe the picture in detail.", n_images=4, seed=5)
    b = tiny.prompt("Count the objects, please.", n_images=4, seed=5)
    common = int((a.input_ids != b.input_ids).nonzero()[0])
    results(engine, [a])
    got = results(engine, [b])[0]
    assert got.cached_tokens == common // BLOCK * BLOCK > 0
    assert got.token_ids == results(plain, [b])[0].token_ids
    assert results(engine, [a])[0].token_ids == results(plain, [a])[0].token_ids


def test_eviction_under_a_tiny_budget_keeps_outputs_and_bounds_memory(tiny):
    block_bytes = 2 * tiny.engine().cache.k[:, 0, :, :BLOCK].numel() * tiny.model.dtype.itemsize
    caches = Caches(10 * block_bytes / (1 << 20) * 8 / 7)  # ~10 KV blocks
    engine, plain = tiny.engine(caches=caches), tiny.engine()
    prompts = [tiny.prompt(f"Question {i} about these.", n_images=3 + i % 2, seed=i % 3) for i in range(6)]
    for _ in range(2):
        for p in prompts:
            assert results(engine, [p])[0].token_ids == results(plain, [p])[0].token_ids
    assert results(engine, prompts[:4]) and caches.prefix.blocks.evictions > 0
    assert caches.prefix.blocks.bytes <= caches.prefix.blocks.max_bytes
    assert caches.features.bytes <= caches.features.max_bytes


def test_a_cached_prefix_is_the_keys_and_values_a_prefill_writes_bit_for_bit(tiny):
    """Blocks are stored in the model's dtype (bf16: half the bytes of the fp32 cache), losslessly."""
    caches = Caches(64)
    engine, plain = tiny.engine(caches=caches), tiny.engine()
    prompt = tiny.prompt("Look closely at these.", n_images=4, seed=8)
    results(engine, [prompt], SamplingParams(max_new_tokens=1))
    assert {b.dtype for b in caches.prefix.blocks.entries.values()} == {tiny.model.dtype}
    for e in (engine, plain):
        e.add_request(prompt, GREEDY)
        e.step()  # admitted and prefilled: row 0
    n = engine.running[0].cached
    assert n == (len(prompt) - 1) // BLOCK * BLOCK > 0
    assert torch.equal(engine.cache.k[:, 0, :, :n], plain.cache.k[:, 0, :, :n])
    assert torch.equal(engine.cache.v[:, 0, :, :n], plain.cache.v[:, 0, :, :n])


def test_logits_after_a_cached_prefix_equal_a_full_forward(v2):
    engine = v2.engine(caches=Caches(64))
    first = v2.prompt("Tell me about them.", n_images=4, seed=7)
    answer = engine.generate([first], GREEDY)[0].token_ids
    second = turn(v2, first, answer, "More please.")
    engine.sampler = Recorder(engine.max_batch, v2.model.config.text_config.vocab_size, engine.device)
    result = engine.generate([second], GREEDY)[0]
    assert result.cached_tokens > len(first)
    ids = second.input_ids
    for logits, token in zip(engine.sampler.logits, result.token_ids):
        with torch.inference_mode():
            full = v2.model(ids[None], pixel_values=second.pixel_values[None],
                            pixel_attention_mask=second.pixel_attention_mask[None])[0, -1]
        torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
        ids = torch.cat([ids, torch.tensor([token])])


def test_chunked_prefill_interleaves_with_running_streams_and_changes_no_token(tiny):
    """A long many-frame prompt joins 3 running requests in chunks of 16 tokens and 4 vision layers per step: the
    running ones get a token every step meanwhile, and every output equals its unchunked, uncached run."""
    engine = tiny.engine(max_batch=4, prefill_chunk=16)
    running = [tiny.prompt(f"Tell me story number {i}.", n_images=i % 2, seed=i) for i in range(3)]
    long = tiny.prompt("What happens in this video?", n_images=6, seed=9)
    params = SamplingParams(max_new_tokens=40)
    for i, p in enumerate(running):
        engine.add_request(p, params, request_id=f"r{i}")
    got = {f"r{i}": [] for i in range(3)} | {"long": []}
    steps = []
    for step in range(200):
        if step == 2:
            engine.add_request(long, GREEDY, request_id="long")
        outputs = engine.step()
        steps.append({o.request_id for o in outputs})
        for o in outputs:
            got[o.request_id] += o.token_ids
        if not engine.has_unfinished():
            break
    joined = next(i for i, s in enumerate(steps) if "long" in s)
    assert joined - 1 >= max(6, len(long) // 16)  # the prompt took that many steps to prefill...
    assert all({"r0", "r1", "r2"} <= s for s in steps[1 : min(joined + 1, 40)])  # ...each one a token for all
    plain = tiny.engine(max_batch=1)
    for rid, p in zip(got, running + [long]):
        assert got[rid] == results(plain, [p], GREEDY if rid == "long" else params)[0].token_ids


def test_chunks_and_caches_together_in_a_mixed_batch(tiny):
    caches = Caches(64)
    engine = tiny.engine(max_batch=3, caches=caches, prefill_chunk=24)
    prompts = [tiny.prompt("Long question about the picture.", n_images=5, seed=1), tiny.prompt("Short."),
               tiny.prompt("Same picture, other words.", n_images=5, seed=1), tiny.prompt("Hi", n_images=1, seed=2),
               tiny.prompt("Long question about the picture.", n_images=5, seed=1)]
    params = [SamplingParams(max_new_tokens=n) for n in (8, 30, 10, 5, 8)]
    ours = [r.token_ids for r in engine.generate(prompts, params)]
    again = [r.token_ids for r in engine.generate(prompts[::-1], params[::-1])][::-1]
    plain = tiny.engine(max_batch=1)
    expected = [plain.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    assert ours == expected and again == expected
    assert caches.prefix.reused > 0 and caches.features.hits > 0


def test_requests_added_from_other_threads_while_steps_store_and_load_blocks(v2):
    """A server's handlers hash and queue requests in their threads while the loop thread stores and copies blocks
    (and evicts: the budget holds 3 blocks, about one prompt): every output is the one without caches."""
    import threading

    block_bytes = 2 * v2.engine().cache.k[:, 0, :, :BLOCK].numel() * v2.model.dtype.itemsize
    caches = Caches(3 * block_bytes / (1 << 20) * 8 / 7)  # ~3 KV blocks
    engine = v2.engine(max_batch=3, caches=caches, prefill_chunk=32)
    prompts = [v2.prompt(f"Question {i % 2} about these?", n_images=4 + i % 2, seed=i % 2) for i in range(9)]
    ids: list[str] = []

    def add(part):
        for i in part:
            ids.append(engine.add_request(prompts[i], GREEDY, request_id=f"q{i}"))

    threads = [threading.Thread(target=add, args=(range(k, 9, 3),)) for k in range(3)]
    for t in threads:
        t.start()
    got = {f"q{i}": [] for i in range(9)}
    while any(t.is_alive() for t in threads) or engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.token_ids
    plain = v2.engine(max_batch=1)
    assert sorted(ids) == sorted(got)
    assert [got[f"q{i}"] for i in range(9)] == [results(plain, [p])[0].token_ids for p in prompts]
    assert caches.prefix.queried > 0 and caches.prefix.blocks.evictions > 0  # looked up, stored, evicted
    assert caches.prefix.blocks.bytes <= caches.prefix.blocks.max_bytes


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
def test_a_frames_vision_pass_is_spread_over_steps_while_others_decode(tiny, cached, layers):
    """With vision_layers=L a step runs at most L frame-layers while requests decode: one encoder layer of a pass
    over L frames (the tiny tower has 2 layers, so every pass spans two steps; the 5th frame's pass alone runs both
    in one step when L=2); each frame is encoded once, and every output equals its unchunked, uncached run. An
    aborted request's pass in progress is dropped."""
    caches = Caches(64) if cached else None
    engine = tiny.engine(max_batch=4, caches=caches, prefill_chunk=16, vision_layers=layers)
    encoder = tiny.model.model.vision_model.encoder
    assert len(encoder.layers) == 2
    frames_run = []  # frames through one layer, per layer call (self_attn runs in the plain and the fused path)
    hooks = [layer.self_attn.register_forward_hook(lambda m, args, out: frames_run.append(args[0].shape[0]))
             for layer in encoder.layers]
    running = [tiny.prompt(f"Tell me story number {i}.") for i in range(3)]
    long = tiny.prompt("What happens in this video?", n_images=5, seed=11)
    params = SamplingParams(max_new_tokens=40)
    for i, p in enumerate(running):
        engine.add_request(p, params, request_id=f"r{i}")
    got, per_step = {f"r{i}": [] for i in range(3)} | {"long": []}, []
    try:
        for step in range(200):
            if step == 2:
                engine.add_request(long, GREEDY, request_id="long")
            before = len(frames_run)
            outputs = engine.step()
            if {"r0", "r1", "r2"} <= {o.request_id for o in outputs}:  # the streams decoded in this step
                per_step.append(sum(frames_run[before:]))
            for o in outputs:
                got[o.request_id] += o.token_ids
            if not engine.has_unfinished():
                break
        assert max(per_step) == layers and sum(frames_run) == 5 * 2  # L frame-layers a step; 5 frames x 2, once
        plain = tiny.engine(max_batch=1)
        for rid, p in zip(got, running + [long]):
            assert got[rid] == results(plain, [p], GREEDY if rid == "long" else params)[0].token_ids

        engine.add_request(running[0], params, request_id="s")
        engine.step()
        engine.add_request(tiny.prompt("Other frames.", n_images=2, seed=12), GREEDY, request_id="gone")
        engine.step()  # "gone" admitted, the first layer of its first frame run
        assert engine.vision.current is not None and engine.vision.current.state.done == 1
        engine.abort("gone")
        engine.step()
        assert engine.vision.current is None and [r.id for r in engine.running] == ["s"]
        engine.abort("s")
        engine.step()
    finally:
        for h in hooks:
            h.remove()
