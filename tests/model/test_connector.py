import pytest
import torch

from smolvlm.model.connector import pixel_shuffle


@pytest.mark.parametrize("n, s", [(8, 2), (12, 3), (27, 3), (32, 4)])
def test_pixel_shuffle_matches_reference(n, s):
    from transformers import SmolVLMConfig
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector

    d = 6
    ref = SmolVLMConnector(SmolVLMConfig(vision_config={"hidden_size": d}, scale_factor=s))
    x = torch.randn(3, n * n, d)
    torch.testing.assert_close(pixel_shuffle(x, s), ref.pixel_shuffle(x, s), rtol=0, atol=0)


def test_pixel_shuffle_ordering():
    # Y[b, i*m + j, (a*s + c)*D + d] = X[b, (i*s + a)*n + (j*s + c), d]
    n, s, d = 6, 3, 2
    m = n // s
    x = torch.arange(2 * n * n * d).view(2, n * n, d)
    y = pixel_shuffle(x, s)
    assert y.shape == (2, m * m, s * s * d)
    for b in range(2):
        for i in range(m):
            for j in range(m):
                for a in range(s):
                    for c in range(s):
                        for e in range(d):
                            assert y[b, i * m + j, (a * s + c) * d + e] == x[b, (i * s + a) * n + (j * s + c), e]


def test_connector_matches_reference(pair):
    x = torch.randn(2, 64, 32)  # [frames, 8x8 patches, D_v]
    with torch.no_grad():
        torch.testing.assert_close(pair.ours.model.connector(x), pair.ref.model.connector(x))
    assert pair.ours.model.connector.modality_projection.proj.bias is None
