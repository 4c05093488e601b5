"""Models of the exact released shapes (from the real config.json files) with seeded random weights: one 512x512 tile
plus text through the reference (eager attention) and through smolvlm, plain and fused for inference (the C++
kernels where they run), in fp32 and in bf16; and the C++ decode step against the plain one at these shapes.

Measured on this machine (logits std 1.0 for 256M v1, 0.62 for 500M v2):
- fp32: max |ours - reference| 1.6e-5 (v1), 3.2e-6 (v2): few-ulp differences of the fused SDPA kernel vs eager
  attention, grown over 12 vision and 30/32 text layers.
- bf16: max |ours - reference bf16| 0.20 (v1), 0.061 (v2), mean 0.022 / 0.009. That is bf16 rounding itself: the
  reference's own bf16 logits are as far from its fp32 ones (max 0.17 / 0.058, mean 0.019 / 0.009), and ours are as
  close to the fp32 reference as the reference's bf16 are (mean ratio 1.00 / 1.00, max ratio 0.85 / 1.04).
"""

import gc

import pytest
import torch

from smolvlm import Model
from smolvlm.model import kernels
from tiny import V1_FILES, V2_FILES, decode_step_both, needs_shared, reference_model

FP32 = dict(atol=1e-4, rtol=1e-4)
BF16 = dict(atol=0.3, rtol=0.05)


def inputs(config):
    g = torch.Generator().manual_seed(0)
    n = config.vision_config.image_size
    seq = (n // config.vision_config.patch_size // config.scale_factor) ** 2
    ids = torch.randint(0, 49152, (1, seq + 24), generator=g)
    ids[0, 10 : 10 + seq] = config.image_token_id
    pixels = torch.rand(1, 1, 3, n, n, generator=g) * 2 - 1
    return ids, pixels


def run_and_free(load, call):
    model = load()
    out = call(model).float()
    del model
    gc.collect()
    return out


@pytest.mark.full_size
@needs_shared
@pytest.mark.parametrize("files", [V1_FILES, V2_FILES], ids=["256M-v1", "500M-v2"])
def test_released_shapes_match_reference(files, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(files)
    ids, pixels = inputs(config)

    def build_and_save():
        ref = reference_model(config, seed=0)  # fp32, eager attention, the reference's own init
        ref.save_pretrained(tmp_path)
        return ref

    def reference_bf16():
        return AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager")

    def ref_call(m):
        return m.eval()(input_ids=ids, pixel_values=pixels).logits

    def our_call(m):
        return m(ids, pixel_values=pixels)

    with torch.no_grad():
        ref32 = run_and_free(build_and_save, ref_call)
        ref16 = run_and_free(reference_bf16, ref_call)
        for fuse in (False, True):  # the plain model, and the inference one (smolvlm.load's: C++ kernels where they run)
            ours32 = run_and_free(lambda: Model.from_pretrained(tmp_path, dtype="float32", fuse=fuse), our_call)
            ours16 = run_and_free(lambda: Model.from_pretrained(tmp_path, dtype="bfloat16", fuse=fuse), our_call)
            torch.testing.assert_close(ours32, ref32, **FP32)
            torch.testing.assert_close(ours16, ref16, **BF16)
            # Our bf16 is as accurate as the reference's bf16, measured against the fp32 reference.
            ours_err, ref_err = (ours16 - ref32).abs(), (ref16 - ref32).abs()
            assert ours_err.mean() <= 1.25 * ref_err.mean()
            assert ours_err.max() <= 1.5 * ref_err.max()
    if kernels.load() is not None:  # the one-call decode step at the real head sizes (64; 9/3 and 15/5 heads)
        fast, plain, cache, plain_cache = decode_step_both(tmp_path, torch.float32, torch.tensor([40, 7]))
        torch.testing.assert_close(fast, plain, **FP32)
        torch.testing.assert_close(cache.k, plain_cache.k, **FP32)
