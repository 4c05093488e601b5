"""The batched sampler: each filter means what transformers' logits processor of the same name means."""

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from smolvlm.errors import InputError
from smolvlm.generation.sampling import Sampler, SamplingParams

V = 12


def reference_probs(logits, p: SamplingParams, input_ids=None):
    """transformers' processed distribution for one row of logits, in generate()'s processor order."""
    scores = logits[None].clone()
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(input_ids[None], scores)
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        warpers.append(MinPLogitsWarper(p.min_p))
    for w in warpers:
        scores = w(None, scores)
    return scores.softmax(-1)[0]


def sample_many(logits, params: SamplingParams, n=6000, prompt=None):
    sampler = Sampler(n, V, "cpu")
    for slot in range(n):
        sampler.set(slot, params, prompt if prompt is not None else torch.tensor([], dtype=torch.long))
    return sampler(logits[None].expand(n, V))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=4),
        SamplingParams(temperature=1.0, top_p=0.6),
        SamplingParams(temperature=0.9, top_k=5, top_p=0.8),
        SamplingParams(temperature=1.5, min_p=0.2),
        SamplingParams(temperature=1.0, top_k=6, top_p=0.9, min_p=0.1, repetition_penalty=1.8),
    ],
    ids=["temperature", "top_k", "top_p", "top_k+top_p", "min_p", "all"],
)
def test_distribution_matches_transformers(params):
    torch.manual_seed(0)
    logits = torch.randn(V) * 2
    prompt = torch.tensor([0, 3, 3, 7])
    expected = reference_probs(logits, params, prompt)
    tokens = sample_many(logits, params, prompt=prompt)
    freq = torch.bincount(tokens, minlength=V).float() / len(tokens)
    assert set(freq.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
    assert torch.allclose(freq, expected, atol=0.025), (freq, expected)


def test_greedy_is_argmax_and_repetition_penalty_matches_transformers():
    torch.manual_seed(1)
    logits = torch.randn(4, V)
    logits[0, :2] = torch.tensor([2.0, 1.5])  # the penalty on token 0 makes token 1 win
    prompt = torch.tensor([int(logits[0].argmax()), int(logits[2].argmax()), 5])
    sampler = Sampler(4, V, "cpu")
    for slot, penalty in enumerate([3.0, 1.0, 0.5, 3.0]):
        sampler.set(slot, SamplingParams(repetition_penalty=penalty), prompt)
    tokens = sampler(logits.clone())
    ref = RepetitionPenaltyLogitsProcessor(3.0)(prompt[None].expand(4, -1), logits.clone()).argmax(-1)
    assert tokens[0] == ref[0] and tokens[0] != logits[0].argmax()  # the penalty changed the choice
    assert tokens[1] == logits[1].argmax()
    assert tokens[2] == logits[2].argmax()  # penalty < 1 boosts the prompt's tokens
    # generated tokens are penalized from the next step on, like transformers' growing input_ids
    again = sampler(logits.clone())
    ref = RepetitionPenaltyLogitsProcessor(3.0)(torch.cat([prompt, tokens[3:4]])[None], logits[3:4].clone())
    assert again[3] == ref.argmax(-1)[0]


def test_seeded_rows_are_reproducible_whatever_shares_the_batch():
    torch.manual_seed(2)
    logits = torch.randn(20, 3, 1000)  # 20 steps, 3 rows, flat-ish distributions
    seeded = SamplingParams(temperature=1.0, seed=1234)

    def run(slots):
        sampler = Sampler(3, 1000, "cpu")
        for slot, p in enumerate(slots):
            sampler.set(slot, p, torch.tensor([1]))
        return torch.stack([sampler(step[: len(slots)]) for step in logits[:, : len(slots)]])

    alone = run([seeded])[:, 0]
    assert torch.equal(run([seeded])[:, 0], alone)
    # in slot 2 of a batch with a greedy and an unseeded sampled row: the same draws as alone
    sampler = Sampler(3, 1000, "cpu")
    for slot, p in enumerate([SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9), seeded]):
        sampler.set(slot, p, torch.tensor([1]))
    in_batch = torch.stack([sampler(torch.stack([step[0], step[1], step[0]]))[2] for step in logits])
    assert torch.equal(in_batch, alone)
    assert not torch.equal(run([SamplingParams(temperature=1.0, seed=99)])[:, 0], alone)


def test_move_carries_a_request_to_another_slot():
    torch.manual_seed(3)
    logits = torch.randn(10, 500)
    p = SamplingParams(temperature=1.0, top_k=50, seed=7, repetition_penalty=1.3)
    a = Sampler(3, 500, "cpu")
    a.set(0, p, torch.tensor([4, 5]))
    expected = torch.stack([a(step[None])[0] for step in logits])
    b = Sampler(3, 500, "cpu")
    b.set(2, p, torch.tensor([4, 5]))
    b.set(0, SamplingParams(), torch.tensor([1]))
    b.set(1, SamplingParams(temperature=0.5), torch.tensor([1]))
    got = [b(torch.stack([logits[0], logits[0], logits[0]]))[2]]
    b.move(2, 0)  # slot 0's request left; the last row moves into the hole
    got += [b(step[None])[0] for step in logits[1:]]
    assert torch.equal(torch.stack(got), expected)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(seed="x"), "seed"),
        (dict(stop=["ok", ""]), "stop"),
    ],
)
def test_bad_parameters_name_the_field(kw, field):
    with pytest.raises(InputError, match=field):
        SamplingParams(**kw)


def test_top_k_larger_than_the_vocabulary_keeps_everything():
    torch.manual_seed(4)
    logits = torch.randn(V)
    params = SamplingParams(temperature=1.0, top_k=10 * V)
    freq = torch.bincount(sample_many(logits, params), minlength=V).float() / 6000
    assert torch.allclose(freq, logits.softmax(-1), atol=0.025)


def test_stop_accepts_one_string():
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
