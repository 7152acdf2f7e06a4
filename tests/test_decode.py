"""The rollout sampling loop (``actors.ppo.decode``) against transformers ``generate`` and a full forward (fast)."""
from __future__ import annotations

import pytest
import torch

from actors.ppo import decode
from actors.ppo.rollout import pad_left, response_logprobs, response_mask

EOS, PAD = 2, 0


def tiny_lm(arch: str):
    import transformers

    name = {"llama": "Llama", "qwen3": "Qwen3", "gpt_neox": "GPTNeoX"}[arch]
    config = getattr(transformers, f"{name}Config")(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=2,
                                                    **({"head_dim": 16, "num_key_value_heads": 1} if arch == "qwen3" else {}))
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()


def prompts():
    return pad_left([[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]], PAD)  # left padding of 0-3 tokens


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox"])
@pytest.mark.parametrize("stop_at_eos", [True, False])
def test_sampled_logprobs_equal_a_full_forward(arch, stop_at_eos):
    """The KV-cache steps see what a forward over the whole sequence sees (positions, left padding, mask):
    each sampled token's log-prob equals the full forward's, and EOS is suppressed without ``stop_at_eos``."""
    model, (ids, mask) = tiny_lm(arch), prompts()
    torch.manual_seed(1)
    tokens, logprobs = decode.sample(model, ids, mask, max_new_tokens=12, eos_id=EOS, pad_id=PAD,
                                     temperature=0.7, top_p=1.0, stop_at_eos=stop_at_eos)
    resp_mask = response_mask(tokens, EOS)
    batch = {"sequences": torch.cat([ids, tokens], 1), "attention_mask": torch.cat([mask, resp_mask], 1),
             "response_mask": resp_mask}
    with torch.no_grad():
        full, _ = response_logprobs(model, batch, temperature=0.7)
    assert torch.allclose(logprobs, full * resp_mask, atol=1e-5)
    assert stop_at_eos or not (tokens == EOS).any()


def test_next_token_distribution_is_transformers_own():
    """Temperature, top-p and EOS suppression give the distribution of ``generate``'s processors."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits, ids = torch.randn(6, 50) * 3, torch.zeros(6, 3, dtype=torch.long)
    processors = LogitsProcessorList([MinNewTokensLengthLogitsProcessor(3, 5, EOS), TemperatureLogitsWarper(0.7),
                                      TopPLogitsWarper(0.8)])
    sampling, scaled = decode.next_token_logits(logits, 0.7, 0.8, suppress_eos=EOS)
    assert torch.equal(torch.softmax(sampling, -1), torch.softmax(processors(ids, logits.clone()), -1))
    assert torch.equal(scaled, logits / 0.7)


def test_inverse_cdf_sampling_picks_where_the_cdf_crosses_the_draw():
    """Against a plain loop, for fixed draws; never a token of probability 0; the frequencies of many draws
    are the probabilities."""
    logits = torch.log(torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.5, 0.0, 0.5]]))
    uniform = torch.tensor([0.05, 0.999])
    expected = []
    for probs, u in zip(torch.softmax(logits, -1), uniform):
        total = 0.0
        for index, p in enumerate(probs.tolist()):
            total += p
            if u < total:
                break
        expected.append(index)
    assert decode.sample_from_logits(logits, uniform).tolist() == expected
    torch.manual_seed(0)
    draws = decode.sample_from_logits(logits[:1].expand(100_000, 4))
    assert 1 not in draws.tolist()
    freq = torch.bincount(draws, minlength=4) / len(draws)
    assert torch.allclose(freq, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.01)


def test_stops_when_every_row_ended_and_pads_after_eos():
    model, (ids, mask) = tiny_lm("llama"), prompts()
    with torch.no_grad():  # make EOS the only likely token: every row ends at its first step
        model.lm_head.bias = torch.nn.Parameter(torch.full((64,), -1e4).index_fill_(0, torch.tensor([EOS]), 0.0))
    tokens, logprobs = decode.sample(model, ids, mask, max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=1.0,
                                     top_p=1.0)
    assert tokens.tolist() == [[EOS]] * 4 and logprobs.abs().max() < 1e-3


@pytest.mark.slow
def test_compiled_step_samples_what_the_eager_loop_samples():
    """``ppo.compile_decode``: the compiled one-token step over a static cache draws the same tokens for the same
    seed, with the same log-probs, as the eager loop over a growing cache."""
    model, (ids, mask) = tiny_lm("qwen3"), prompts()
    kwargs = {"max_new_tokens": 8, "eos_id": EOS, "pad_id": PAD, "temperature": 1.0, "top_p": 1.0,
              "stop_at_eos": False}
    torch.manual_seed(3)
    eager = decode.sample(model, ids, mask, **kwargs)
    torch.manual_seed(3)
    compiled = decode.sample(model, ids, mask, step=decode.compile_step(model), **kwargs)
    assert torch.equal(eager[0], compiled[0]) and torch.allclose(eager[1], compiled[1], atol=1e-5)
