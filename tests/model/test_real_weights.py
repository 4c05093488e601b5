"""Fidelity on real weights (tests/real_weights.py: SmolLM2-135M-Instruct's trained decoder in a SmolVLM-256M-shaped
checkpoint): greedy fp32 against the reference, batch invariance in every dtype, and the teacher-forced agreement of
bf16 and int8 with the reference's fp32 logits. Real weights have outlier activations and near-tied logits that
random ones don't, so they show what rounding does to answers.
"""

import gc
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from smolvlm import Model
from smolvlm.generation import Engine, Prompt, SamplingParams, end_token_ids
from smolvlm.model import kernels
from real_weights import real_checkpoint
from tiny import needs_shared

pytestmark = needs_shared

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Explain photosynthesis in one sentence.",
    "Give me a synonym for happy.",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
]
N = 24  # new tokens per request

# ~500 tokens of English (public domain: the opening of Jane Austen's Pride and Prejudice), for teacher forcing.
TEXT = """It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of
a wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood, this
truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property of some
one or other of their daughters. "My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield
Park is let at last?" Mr. Bennet replied that he had not. "But it is," returned she; "for Mrs. Long has just been
here, and she told me all about it." Mr. Bennet made no answer. "Do you not want to know who has taken it?" cried his
wife impatiently. "You want to tell me, and I have no objection to hearing it." This was invitation enough. "Why, my
dear, you must know, Mrs. Long says that Netherfield is taken by a young man of large fortune from the north of
England; that he came down on Monday in a chaise and four to see the place, and was so much delighted with it, that he
agreed with Mr. Morris immediately; that he is to take possession before Michaelmas, and some of his servants are to
be in the house by the end of next week." "What is his name?" "Bingley." "Is he married or single?" "Oh! Single, my
dear, to be sure! A single man of large fortune; four or five thousand a year. What a fine thing for our girls!" "How
so? How can it affect them?" "My dear Mr. Bennet," replied his wife, "how can you be so tiresome! You must know that I
am thinking of his marrying one of them." "Is that his design in settling here?" "Design! Nonsense, how can you talk
so! But it is very likely that he may fall in love with one of them, and therefore you must visit him as soon as he
comes." "I see no occasion for that. You and the girls may go, or you may send them by themselves, which perhaps will
be still better, for as you are as handsome as any of them, Mr. Bingley may like you the best of the party." "My dear,
you flatter me. I certainly have had my share of beauty, but I do not pretend to be anything extraordinary now. When a
woman has five grown-up daughters, she ought to give over thinking of her own beauty." "In such cases, a woman has not
often much beauty to think of." "But, my dear, you must indeed go and see Mr. Bingley when he comes into the
neighbourhood." "It is more than I engage for, I assure you." "But consider your daughters. Only think what an
establishment it would be for one of them. Sir William and Lady Lucas are determined to go, merely on that account."
""".replace("\n", " ")

IMAGE_BLOCK = "<fake_token_around_image><global-img>" + "<image>" * 64 + "<fake_token_around_image>"


@pytest.fixture(scope="module")
def real():
    folder = real_checkpoint()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return SimpleNamespace(folder=folder, tokenizer=tokenizer, end_ids=end_token_ids(folder, tokenizer))


def prompt(real, text: str, image_seed: int | None = None) -> Prompt:
    """A chat prompt; with image_seed, one 512x512 frame of random pixels before the text."""
    image = "" if image_seed is None else IMAGE_BLOCK
    ids = torch.tensor(real.tokenizer.encode(f"<|im_start|>User:{image}{text}<end_of_utterance>\nAssistant:").ids)
    if image_seed is None:
        return Prompt(ids)
    pixels = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(image_seed)) * 2 - 1
    return Prompt(ids, pixels, torch.ones(1, 512, 512, dtype=torch.long))


def engine(real, dtype, quantize=None, max_batch=8) -> Engine:
    model = Model.from_pretrained(real.folder, dtype=dtype, fuse=True, quantize=quantize)
    processor = SimpleNamespace(tokenizer=real.tokenizer, pad_token_id=2)
    return Engine(model, processor, real.end_ids, max_batch=max_batch, max_len=256)


def reference(real, dtype):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(real.folder, dtype=dtype, attn_implementation="eager").eval()


def test_fp32_greedy_answers_are_the_references(real):
    prompts = [prompt(real, q) for q in QUESTIONS[:4]]
    ours = [r.token_ids for r in engine(real, torch.float32).generate(prompts, SamplingParams(max_new_tokens=N))]
    assert real.tokenizer.decode(ours[0]).strip().startswith("The capital of France is Paris.")
    ref = reference(real, torch.float32)
    with torch.inference_mode():
        for p, tokens in zip(prompts, ours):
            out = ref.generate(input_ids=p.input_ids[None], max_new_tokens=N, do_sample=False)[0, len(p) :].tolist()
            cut = next((i + 1 for i, t in enumerate(out) if t in real.end_ids), len(out))
            assert tokens == out[:cut]


@pytest.mark.skipif(kernels.load() is None, reason="batch invariance is a property of the C++ kernels")
@pytest.mark.parametrize(
    "dtype,quantize",
    [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "int8")],
    ids=["fp32", "bf16", "int8"],
)
def test_a_request_gets_the_same_tokens_in_any_batch(real, dtype, quantize):
    """The same request alone, at slot 1 of 2, at slot 7 of 8 prefilled with 6 others and an image request, and
    prefilled alone while 3 others are decoding: the same tokens (and the image request's alone and in the batch)."""
    eng = engine(real, dtype, quantize)
    params = SamplingParams(max_new_tokens=N)
    target, image = prompt(real, QUESTIONS[0]), prompt(real, "Describe this picture.", image_seed=0)
    others = [prompt(real, q) for q in QUESTIONS[1:]]

    def run(batch):
        return [r.token_ids for r in eng.generate(batch, params)]

    alone, image_alone = run([target])[0], run([image])[0]
    assert run([others[0], target])[1] == alone
    batch = run([*others[:6], image, target])
    assert batch[7] == alone and batch[6] == image_alone
    ids = [eng.add_request(p, params) for p in others[3:6]]
    for _ in range(3):
        eng.step()  # the others are decoding when the target is prefilled alone
    late = eng.add_request(target, params)
    tokens = {i: [] for i in [*ids, late]}
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id] += out.token_ids
    assert tokens[late] == alone


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out)[0].float()  # [T, V]


def agreement(logits: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, float, float]:
    """(top-1 agreement, max |logit error|, mean |logit error|, mean KL(truth || logits)) of teacher-forced logits
    [T, V] against the reference fp32 ones."""
    error = (logits - truth).abs()
    kl = F.kl_div(logits.log_softmax(-1), truth.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    top1 = (logits.argmax(-1) == truth.argmax(-1)).float().mean()
    return top1.item(), error.max().item(), error.mean().item(), kl.item()


def test_bf16_and_int8_keep_the_reference_fp32_answers_teacher_forced(real):
    """Top-1 agreement with the reference's fp32 logits: our bf16 no worse than the reference's own bf16 minus one
    point, int8 (on an fp32 and on a bf16 model) no worse than our bf16 minus one point (measured: 97.4% reference
    bf16, 97.9% ours, 97.4% int8 on fp32, 97.3% int8 on bf16; per-row int8 scales gave 92-93%, and a bf16 model's
    int8 decoder computing in bf16 instead of fp32 96.5%)."""
    ids = torch.tensor(real.tokenizer.encode(TEXT).ids)[None]
    assert 450 <= ids.shape[1] <= 700
    scores = {}
    for name, load in [
        ("reference fp32", lambda: reference(real, torch.float32)),
        ("reference bf16", lambda: reference(real, torch.bfloat16)),
        ("bf16", lambda: Model.from_pretrained(real.folder, dtype=torch.bfloat16, fuse=True)),
        ("int8 bf16", lambda: Model.from_pretrained(real.folder, dtype=torch.bfloat16, quantize="int8")),
        ("int8 fp32", lambda: Model.from_pretrained(real.folder, dtype=torch.float32, quantize="int8")),
    ]:
        model = load()
        logits = logits_of(model, ids)[:, :49152]  # the real vocabulary (the extra rows are random)
        del model
        gc.collect()
        if name == "reference fp32":
            truth = logits
            continue
        scores[name] = agreement(logits, truth)
    print("teacher-forced top-1 agreement, max and mean |logit error|, KL vs reference fp32:", scores)
    assert scores["bf16"][0] >= scores["reference bf16"][0] - 0.01
    assert scores["int8 fp32"][0] >= scores["bf16"][0] - 0.01
    assert scores["int8 bf16"][0] >= scores["bf16"][0] - 0.01
    assert scores["int8 bf16"][1] < 2 * scores["reference bf16"][1]
