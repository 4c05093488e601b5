"""Inference fast paths (smolvlm/model/fast.py) against the plain model: fused and reordered weights give the same
fp32 logits and greedy text, unfuse gives back the exact HF module tree, int8 stays within a bounded logit error.
Each test runs on both CPU paths: the C++ kernels (smolvlm/model/kernels.py) and torch's oneDNN/fbgemm kernels that
CPUs without AVX512-BF16 get."""

from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer

from smolvlm import InputError, Model
from smolvlm.generation import Engine, Prompt, SamplingParams, end_token_ids
from smolvlm.model import kernels
from smolvlm.model.fast import FastLinear, decoder_weights
from tiny import TINY_IMAGE_SEQ_LEN, compiled_or_fallback, make_tiny_checkpoint

IMAGE_BLOCK = "<fake_token_around_image><global-img>" + "<image>" * TINY_IMAGE_SEQ_LEN + "<fake_token_around_image>"


@pytest.fixture(scope="module", params=["v2", "v1"])
def folder(request):
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(autouse=True, params=["compiled", "fallback"])
def path(request, monkeypatch):
    """Which CPU kernels fused models use: the C++ ones, or torch's (as where those can't be built or run)."""
    unavailable = "the C++ kernels don't run here (they need a C++ compiler and an AVX512-BF16 CPU)"
    return compiled_or_fallback(request, monkeypatch, kernels, unavailable)


COPIED_KIND = {"compiled": "packed", "fallback": "reordered"}  # how fused text-decoder layers run on each path
INT8_KIND = {"compiled": "packed_int8", "fallback": "int8"}


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tiny SmolVLM2 whose lm_head is the embedding matrix (tie_word_embeddings)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_tied"), "smolvlm", seed=2, tie_word_embeddings=True)


def inputs(seed=0, rows=2, length=TINY_IMAGE_SEQ_LEN + 20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49152, (rows, length), generator=g)
    ids[:, 3 : 3 + TINY_IMAGE_SEQ_LEN] = 49190  # one image per row
    return dict(input_ids=ids, pixel_values=torch.rand(rows, 1, 3, 64, 64, generator=g) * 2 - 1)


@torch.inference_mode()
def logits(model, **kw):
    return model(**kw).float()


def greedy(model, folder, n=24):
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    engine = Engine(model, SimpleNamespace(tokenizer=tokenizer, pad_token_id=2), end_token_ids(folder, tokenizer))
    g = torch.Generator().manual_seed(7)
    prompts = [
        Prompt(torch.tensor(tokenizer.encode("<|im_start|>User:Tell me a story.<end_of_utterance>\nAssistant:").ids)),
        Prompt(
            torch.tensor(tokenizer.encode(f"<|im_start|>User:{IMAGE_BLOCK}What is it?<end_of_utterance>\nAssistant:").ids),
            torch.rand(1, 3, 64, 64, generator=g) * 2 - 1,
            torch.ones(1, 64, 64, dtype=torch.long),
        ),
    ]
    return [r.token_ids for r in engine.generate(prompts, SamplingParams(max_new_tokens=n))]


def test_fused_model_gives_the_plain_logits_and_greedy_text_in_fp32(folder, path):
    plain = Model.from_pretrained(folder)
    fused = Model.from_pretrained(folder, fuse=True)
    kinds = {m.kind for m in fused.modules() if isinstance(m, FastLinear)}
    assert kinds == {COPIED_KIND[path], "view"}  # copied text layers; vision on its own weights (oneDNN)
    assert (decoder_weights(fused) is not None) == (path == "compiled")  # the engine's one-call decode step
    attention = fused.model.vision_model.encoder.layers[0].self_attn
    assert attention.use_kernels == (path == "compiled" and not kernels.amx())  # with AMX, torch's is faster
    assert not any(isinstance(m, torch.nn.Linear) for m in fused.modules())
    x = inputs()
    torch.testing.assert_close(logits(fused, **x), logits(plain, **x), rtol=1e-4, atol=1e-4)
    assert greedy(fused, folder) == greedy(plain, folder)
    # fuse() on a loaded model is the same model as loading it fused
    torch.testing.assert_close(logits(Model.from_pretrained(folder).fuse(), **x), logits(fused, **x), rtol=0, atol=0)


def test_unfuse_gives_back_the_exact_hf_module_tree(folder):
    model = Model.from_pretrained(folder)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    vision_weight = model.model.vision_model.encoder.layers[0].mlp.fc1.weight
    model.fuse()
    assert model.fused
    assert model.model.text_model.layers[0].self_attn.q_proj is None  # q/k/v now live in qkv_proj
    assert model.model.vision_model.encoder.layers[0].mlp.fc1_gelu.weight is vision_weight  # not copied
    with pytest.raises(InputError, match="unfuse"):
        model.state_dict()
    model.unfuse()
    assert not model.fused and [n for n, _ in model.named_modules()] == names
    assert not model.model.vision_model.encoder.layers[0].self_attn.use_kernels
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert model.model.vision_model.encoder.layers[0].mlp.fc1.weight is vision_weight


def test_tied_lm_head_fuses_and_unties_back(tied):
    plain = Model.from_pretrained(tied)
    fused = Model.from_pretrained(tied, fuse=True)
    x = inputs(seed=1)
    torch.testing.assert_close(logits(fused, **x), logits(plain, **x), rtol=1e-4, atol=1e-4)
    fused.unfuse()
    assert fused.lm_head.weight is fused.model.text_model.embed_tokens.weight
    torch.testing.assert_close(logits(fused, **x), logits(plain, **x), rtol=0, atol=0)


def test_bf16_fused_engine_matches_plain_bf16_logits(tiny_v2):
    """bf16 fused kernels and the engine's fp32 CPU cache keep bf16 logits within bf16 rounding of the plain path."""
    plain = Model.from_pretrained(tiny_v2, dtype="bfloat16")
    fused = Model.from_pretrained(tiny_v2, dtype="bfloat16", fuse=True)
    x = inputs(seed=2)
    ref, got = logits(plain, **x), logits(fused, **x)
    assert (got - ref).norm() / ref.norm() < 0.02
    engine = Engine(fused, SimpleNamespace(tokenizer=None, pad_token_id=2), [])
    assert engine.cache.k.dtype == torch.float32  # fast CPU attention


def test_int8_logit_error_is_bounded_and_decoding_runs(folder, path):
    """int8 (weights per channel; torch's path also activations per call) stays within a few times bf16's own
    rounding error."""
    fp32 = Model.from_pretrained(folder)
    int8 = Model.from_pretrained(folder, quantize="int8")
    assert {m.kind for m in int8.model.text_model.modules() if isinstance(m, FastLinear)} == {INT8_KIND[path]}
    assert int8.lm_head.kind == INT8_KIND[path]
    x = inputs(seed=3)
    ref = logits(fp32, **x)

    def error(model):
        got = logits(model, **x)
        return ((got - ref).norm() / ref.norm()).item(), (got.argmax(-1) == ref.argmax(-1)).float().mean().item()

    bf16_error, _ = error(Model.from_pretrained(folder, dtype="bfloat16"))
    for model in (int8, Model.from_pretrained(folder, dtype="bfloat16", quantize="int8")):
        relative, top1 = error(model)
        assert 0 < relative < 4 * bf16_error  # quantized (not equal), but close: ~3x bf16's error on these models
        assert top1 > 0.85
    assert all(len(t) >= 1 for t in greedy(int8, folder, n=8))


def test_int8_unfuse_gives_dequantized_hf_layers(tiny_v2):
    model = Model.from_pretrained(tiny_v2, quantize="int8").unfuse()
    plain = Model.from_pretrained(tiny_v2)
    ours, ref = model.state_dict(), plain.state_dict()
    assert ours.keys() == ref.keys()
    w, w_ref = ours["model.text_model.layers.0.mlp.up_proj.weight"], ref["model.text_model.layers.0.mlp.up_proj.weight"]
    step = w_ref.abs().amax(dim=1, keepdim=True) / 127  # one int8 step per output channel
    assert not torch.equal(w, w_ref) and ((w - w_ref).abs() <= step / 2 + 1e-6).all()


def test_bad_quantize_names_the_options(tiny_v2):
    with pytest.raises(InputError, match="int4.*int8"):
        Model.from_pretrained(tiny_v2, quantize="int4")
    with pytest.raises(InputError, match="int4.*int8"):
        Model.from_pretrained(tiny_v2).fuse(quantize="int4")
    with pytest.raises(InputError, match="already fused.*unfuse"):
        Model.from_pretrained(tiny_v2, fuse=True).fuse(quantize="int8")
