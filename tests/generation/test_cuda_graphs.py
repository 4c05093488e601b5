"""The static-shape decode step of cuda_graphs.py: padded to a batch bucket and a key bucket it gives the unpadded
step's logits and greedy tokens, and its padding rows change nothing real. The graph capture itself needs CUDA."""

import pytest
import torch

from smolvlm.generation import SamplingParams
from smolvlm.generation.cuda_graphs import GraphDecoder, batch_buckets, key_bucket
from smolvlm.model.kv_cache import KVCache

MAX_LEN = 512


def test_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(1) == [1]
    assert [key_bucket(k, 4096) for k in (1, 64, 256, 257, 1000, 4096)] == [256, 256, 256, 512, 1024, 4096]
    assert key_bucket(700, 768) == 768


def prefilled(model, lengths, max_batch, device="cpu", seed=0):
    """A cache whose rows 0..n-1 hold prompts of `lengths` (prefilled by the text model) and whose other rows hold
    random values (rows of requests still being prefilled); the next decode tokens and positions."""
    t = model.config.text_config
    cache = KVCache(t.num_hidden_layers, max_batch, t.num_key_value_heads, MAX_LEN, t.head_dim,
                    dtype=model.dtype, device=device)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g)), cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    n, length = len(lengths), max(lengths)
    ids = torch.randint(0, t.vocab_size, (n, length), generator=g).to(device)
    steps = torch.arange(length, device=device).expand(n, length)
    with torch.inference_mode():  # right-padded rows: the padding's keys sit past each row's end, never attended
        model.model.text_model(model.embed(ids), steps, cache=cache, cache_positions=steps)
    tokens = torch.randint(0, t.vocab_size, (n,), generator=g).to(device)
    return cache, tokens, torch.tensor(lengths, device=device)


def copy(cache):
    clone = object.__new__(KVCache)
    clone.k, clone.v = cache.k.clone(), cache.v.clone()
    return clone


def test_padded_static_step_gives_the_unpadded_logits_and_cache(v2):
    model = v2.model
    cache, tokens, positions = prefilled(model, [5, 17, 9], max_batch=8)
    before = copy(cache)
    plain_cache = copy(cache)
    with torch.inference_mode():
        plain = model.decode(tokens, positions, plain_cache, keys=64)  # [3, V], the engine's unpadded step
        decoder = GraphDecoder(model, cache, capture=False)
        padded = decoder(tokens, positions, cache, keys=64)  # rows padded to 4, keys to 256
    assert list(decoder.graphs) == [(4, 256)]
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=0)
    assert (padded.argmax(-1) == plain.argmax(-1)).all()
    # rows 0..2: the same keys/values written; row 3 (padding): only its last position; rows 4..7 untouched
    for new, old in ((cache.k, plain_cache.k), (cache.v, plain_cache.v)):
        torch.testing.assert_close(new[:, :3], old[:, :3], atol=1e-6, rtol=0)
    for new, old in ((cache.k, before.k), (cache.v, before.v)):
        assert torch.equal(new[:, 3, :, : MAX_LEN - 1], old[:, 3, :, : MAX_LEN - 1])
        assert not torch.equal(new[:, 3, :, MAX_LEN - 1], old[:, 3, :, MAX_LEN - 1])
        assert torch.equal(new[:, 4:], old[:, 4:])


def test_padding_rows_do_not_change_real_rows(v2):
    model = v2.model
    cache, tokens, positions = prefilled(model, [11, 30], max_batch=4, seed=1)
    start = copy(cache)
    decoder = GraphDecoder(model, cache, capture=False)
    with torch.inference_mode():
        first = decoder(tokens, positions, cache, keys=64).clone()
        cache.k.copy_(start.k), cache.v.copy_(start.v)
        cache.k[:, 2:].normal_(), cache.v[:, 2:].mul_(-3)  # other rows' contents and other padding tokens
        decoder.tokens[2:] = torch.tensor([7, 49000])
        again = decoder(tokens, positions, cache, keys=64)  # batch 2: no padding rows
        decoder3 = GraphDecoder(model, cache, capture=False)
        cache.k.copy_(start.k), cache.v.copy_(start.v)
        three = decoder3(torch.cat([tokens, tokens[:1]]), torch.cat([positions, positions.new_tensor([3])]), cache, 64)
    assert torch.equal(again, first)
    torch.testing.assert_close(three[:2], first, atol=1e-5, rtol=0)  # a third row, padded to 4: same first two


def test_engine_with_the_static_step_gives_the_same_greedy_tokens(v2):
    """Requests join while others decode and are prefilled in chunks (so padding rows are rows being prefilled); every
    request's tokens equal the unpadded engine's, and a request's alone."""
    prompts = [v2.prompt("Tell me a story about a cat."), v2.prompt("Hi"),
               v2.prompt("What is in this image?", n_images=1, seed=1),
               v2.prompt("Compare the three pictures.", n_images=3, seed=2),  # prefilled in row 3 while 3 rows decode
               v2.prompt("And this one?", n_images=1, seed=4)]
    lengths = [30, 30, 25, 15, 9]

    def run(static: bool):
        engine = v2.engine(max_batch=8, prefill_chunk=8)
        if static:
            engine.decode_step = GraphDecoder(v2.model, engine.cache, capture=False)
        out = {}
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            engine.add_request(p, SamplingParams(max_new_tokens=n), request_id=str(i))
            for o in engine.step() + engine.step():  # the next joins two steps later
                out.setdefault(o.request_id, []).extend(o.token_ids)
        while engine.has_unfinished():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
        return [out[str(i)] for i in range(len(prompts))], engine

    static, engine = run(True)
    assert static == run(False)[0]
    assert {b for b, _ in engine.decode_step.graphs} >= {2, 4}  # real padding happened (3 decoding rows -> 4)
    assert [len(t) for t in static] == lengths
    alone = [r.token_ids for r in v2.engine().generate([prompts[3]], SamplingParams(max_new_tokens=15))]
    assert static[3] == alone[0]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs: needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_replays_the_eager_static_step(tiny_v2, make_tiny, dtype):
    """A captured graph runs the eager padded step's kernels: bit for bit the same logits and cache."""
    model = make_tiny(tiny_v2, dtype, device="cuda").model
    cache, tokens, positions = prefilled(model, [5, 17, 9], max_batch=8, device="cuda")
    start, eager_cache = copy(cache), copy(cache)
    with torch.inference_mode():
        eager = GraphDecoder(model, eager_cache, capture=False)(tokens, positions, eager_cache, keys=64).clone()
        decoder = GraphDecoder(model, cache)
        first = decoder(tokens, positions, cache, keys=64).clone()  # warm-up, capture, replay
        cache.k.copy_(start.k), cache.v.copy_(start.v)
        replayed = decoder(tokens, positions, cache, keys=64).clone()  # a replay alone
    assert isinstance(decoder.graphs[4, 256][0], torch.cuda.CUDAGraph)
    torch.testing.assert_close(replayed, first, rtol=0, atol=0)
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(cache.k, eager_cache.k, rtol=0, atol=0)
    torch.testing.assert_close(cache.v, eager_cache.v, rtol=0, atol=0)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_on_cuda_gives_the_eager_steps_greedy_tokens(tiny_v2, make_tiny, v2, dtype):
    """Through the engine (prefill on CUDA, decode replaying graphs), the greedy tokens of the eager static step, and
    in fp32 those of the CPU engine."""
    tiny = make_tiny(tiny_v2, dtype, device="cuda")
    prompts = [tiny.prompt("Tell me a story about a cat."), tiny.prompt("What is in this image?", n_images=1, seed=1),
               tiny.prompt("Compare the three pictures.", n_images=3, seed=2)]
    params = SamplingParams(max_new_tokens=20)
    engine = tiny.engine(max_batch=8)
    assert isinstance(engine.decode_step, GraphDecoder)
    graphs = [r.token_ids for r in engine.generate(prompts, params)]
    assert (4, 256) in engine.decode_step.graphs  # the three rows decoded together, padded to 4
    eager_engine = tiny.engine(max_batch=8)
    eager_engine.decode_step = GraphDecoder(tiny.model, eager_engine.cache, capture=False)
    assert graphs == [r.token_ids for r in eager_engine.generate(prompts, params)]
    if dtype == "float32":
        assert graphs == [r.token_ids for r in v2.engine(max_batch=8).generate(prompts, params)]
