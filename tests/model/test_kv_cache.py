import torch

from smolvlm.model import KVCache


def test_preallocated_shape_and_dtype():
    cache = KVCache(3, 4, 2, 16, 8, dtype=torch.bfloat16, device="cpu")
    assert cache.k.shape == cache.v.shape == (3, 4, 2, 16, 8)
    assert cache.k.dtype == torch.bfloat16 and cache.max_batch == 4 and cache.max_len == 16


def test_write_places_each_row_at_its_positions_and_returns_views():
    cache = KVCache(2, 3, 2, 10, 4)
    k_ptr, v_ptr = cache.k.data_ptr(), cache.v.data_ptr()
    k_new = torch.randn(2, 2, 3, 4)
    v_new = torch.randn(2, 2, 3, 4)
    positions = torch.tensor([[4, 5, 6], [0, 1, 2]])  # rows at different lengths
    k, v = cache.write(1, k_new, v_new, positions)
    assert k.shape == v.shape == (2, 2, 10, 4)
    torch.testing.assert_close(k[0, :, 4:7], k_new[0], rtol=0, atol=0)
    torch.testing.assert_close(v[1, :, 0:3], v_new[1], rtol=0, atol=0)
    assert k[0, :, :4].abs().sum() == 0 and k[0, :, 7:].abs().sum() == 0  # nothing else written
    assert cache.k[0].abs().sum() == 0 and cache.k[1, 2].abs().sum() == 0  # other layer, rows >= B untouched
    # Views into the cache, which is never reallocated.
    k[0, 0, 9, 0] = 7.0
    assert cache.k[1, 0, 0, 9, 0] == 7.0
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == (k_ptr, v_ptr)


def test_write_converts_to_cache_dtype():
    cache = KVCache(1, 1, 1, 4, 2, dtype=torch.bfloat16)
    k_new = torch.tensor([[[[1.0009765625, 2.0]]]])
    k, _ = cache.write(0, k_new, k_new, torch.tensor([[3]]))
    assert k.dtype == torch.bfloat16
    assert torch.equal(k[0, 0, 3], k_new[0, 0, 0].to(torch.bfloat16))


def test_rows_view_writes_into_the_shared_storage_from_its_start_row():
    cache = KVCache(n_layers=1, max_batch=4, n_kv_heads=1, max_len=3, head_dim=2)
    view = cache.rows(2)
    assert view.max_batch == 2 and view.max_len == 3
    new = torch.ones(1, 1, 1, 2)
    view.write(0, new, 2 * new, torch.tensor([[1]]))  # row 0 of the view is row 2 of the cache
    assert cache.k[0, 2, 0, 1].tolist() == [1.0, 1.0] and cache.v[0, 2, 0, 1].tolist() == [2.0, 2.0]
    assert cache.k.count_nonzero() == 2 and cache.v.count_nonzero() == 2


def resident_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_a_cpu_cache_takes_memory_only_for_the_tokens_written():
    """A server's cache (8 slots x 8192 tokens: 1.5 GB at the 256M shape in fp32) costs the resident memory of what
    its rows hold, not of its size; it reads as zeros."""
    before = resident_mb()
    cache = KVCache(30, 8, 3, 8192, 64)
    assert resident_mb() - before < 20
    assert cache.k.abs().amax() == 0 and cache.v[:, :, :, -1].abs().amax() == 0  # zeros, read everywhere
    positions = torch.arange(1000)[None].expand(2, 1000)
    for layer in range(30):  # two rows of 1000 tokens: 2 x 1000 x 30 layers x 2 x 3 x 64 x 4 B = 92 MB
        cache.write(layer, torch.ones(2, 3, 1000, 64), torch.ones(2, 3, 1000, 64), positions)
    assert 80 < resident_mb() - before < 120
    assert cache.k[:, :2, :, :1000].min() == 1 and cache.k[:, :2, :, 1000:].abs().amax() == 0
