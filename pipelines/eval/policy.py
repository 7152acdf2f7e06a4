"""Policy quality of a run's chat models (sft, ppo/grpo) on the PPO prompt set, judged by the run's reward model.

For each policy, one response per prompt is sampled as PPO's rollouts are (``ppo.temperature``, top-p 1, no
top-k, ``ppo.max_new_tokens``, up to the first EOS), with a fixed seed, so a rerun draws the same responses.
Then, per policy:

- ``reward_mean``: the reward model's mean score of (prompt, response), what PPO's ``reward_mean`` logs (the
  reward model part: ``ppo.reward_functions`` live with the actors, a floor above, and are not scored here);
- ``win_rate_vs_sft``: the share of prompts where the reward model scores the policy's response above the sft
  policy's response to the same prompt (ties count half; null for sft itself);
- ``kl_to_sft``: KL(policy || sft) in nats per response: along each sampled response, the exact KL between the
  two next-token distributions, summed over the response's tokens; its mean over prompts estimates the KL of
  the response distributions (chain rule), with less variance than log-ratio estimates on the same samples.

The built-in prompts are SFT's held-out questions, which PPO trains on: these numbers say how well each policy
does what PPO optimised, not how it generalises to unseen prompts (pass ``ppo.prompts`` for your own set).
"""
from __future__ import annotations

import hashlib
import json

import torch

SEED = 1234  # the sampling seed: fixed, so a rerun draws the same responses
BATCH = 64  # prompts per generate call: fixed (the draws depend on the batches), large (4x faster than 8 here)


def policy_chats(recipe) -> tuple[str, list[list[dict]]]:
    """(source, chats): ``ppo.prompts`` (``prompt`` strings or ``messages`` chats), else the built-in questions."""
    if recipe.ppo.prompts:
        from pipelines.chat.records import iter_records

        chats = []
        for where, record in iter_records(recipe.ppo.prompts):
            if isinstance(record.get("prompt"), str):
                chats.append([{"role": "user", "content": record["prompt"]}])
            elif isinstance(record.get("messages"), list) and record["messages"]:
                chats.append(record["messages"])
            else:
                raise ValueError(f"{where}: needs a `prompt` string or a `messages` list")
        return recipe.ppo.prompts, chats
    from pipelines.chat.builtin_qa import builtin_pairs, split_pairs

    _, held_out = split_pairs(builtin_pairs(), recipe.sft.val_fraction)
    return "builtin", [[{"role": "user", "content": p.question}] for p in held_out]


@torch.no_grad()
def sample(model, prompts: list[list[int]], pad_id: int, eos_id: int, max_new: int, temperature: float,
           batch_size: int) -> list[list[int]]:
    """One sampled response per prompt (left-padded batches), each cut after its first EOS."""
    torch.manual_seed(SEED)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None, top_p=1.0, top_k=0,
                             max_new_tokens=max_new, pad_token_id=pad_id, eos_token_id=eos_id)[:, width:]
        for row in gen.tolist():
            out.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return out


def right_padded(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """prompt + response rows, right-padded (a causal model's real tokens then keep positions 0..n-1): ids, mask."""
    rows = [p + r for p, r in zip(prompts, responses)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


@torch.no_grad()
def response_kls(policy, reference, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                 batch: int = BATCH) -> list[float]:
    """Per response: the sum over its positions of KL(policy(.|prefix) || reference(.|prefix)), in nats."""
    out = []
    for i in range(0, len(prompts), batch):
        ps, rs = prompts[i:i + batch], responses[i:i + batch]
        ids, mask = right_padded(ps, rs, pad_id)
        logp = policy(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        logq = reference(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        per_position = (logp.exp() * (logp - logq)).sum(-1)  # [B, T]: KL of the next-token distributions
        for row, (p, r) in enumerate(zip(ps, rs)):
            start = len(p) - 1  # the logits that predict the response's tokens
            out.append(float(per_position[row, start:start + len(r)].sum()))
    return out


@torch.no_grad()
def reward_scores(reward_model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                  batch: int = BATCH) -> list[float]:
    from pipelines.reward.model import sequence_scores

    out = []
    for i in range(0, len(prompts), batch):
        ids, mask = right_padded(prompts[i:i + batch], responses[i:i + batch], pad_id)
        out += sequence_scores(reward_model, ids, mask).tolist()
    return out


def evaluate_policies(paths: dict[str, str], reward_dir: str | None, recipe) -> dict:
    """results.json's ``policy`` entry. ``paths``: {"sft": dir, "ppo": dir, ...}; sft is the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.hf_models import load_reward_model

    torch.manual_seed(0)
    cfg = recipe.ppo
    tokenizer = AutoTokenizer.from_pretrained(paths["sft"])
    source, chats = policy_chats(recipe)
    prompts = [list(tokenizer.apply_chat_template(c, tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])[-cfg.max_prompt_len:]
               for c in chats]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
    reference = load(paths["sft"])
    judge = load_reward_model(reward_dir).eval() if reward_dir else None
    scores, models = {}, {}
    for name, path in paths.items():
        policy = reference if name == "sft" else load(path)
        responses = sample(policy, prompts, pad, tokenizer.eos_token_id, cfg.max_new_tokens, cfg.temperature,
                           BATCH)
        kls = [0.0] * len(prompts) if policy is reference else response_kls(policy, reference, prompts, responses,
                                                                              pad)
        row = {"kl_to_sft": round(sum(kls) / len(kls), 4),
               "response_tokens_mean": round(sum(map(len, responses)) / len(responses), 2),
               "ended_with_eos": round(sum(r[-1:] == [tokenizer.eos_token_id] for r in responses) / len(responses), 4)}
        if judge is not None:
            scores[name] = reward_scores(judge, prompts, responses, pad)
            row["reward_mean"] = round(sum(scores[name]) / len(prompts), 4)
            row["win_rate_vs_sft"] = None if name == "sft" else round(sum(
                1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores[name], scores["sft"])) / len(prompts), 4)
        row["example"] = {"prompt": chats[0][-1]["content"],
                          "response": tokenizer.decode(responses[0], skip_special_tokens=True)}
        models[name] = row
    digest = hashlib.sha256(json.dumps(chats, sort_keys=True).encode()).hexdigest()
    return {"prompts": {"source": source, "count": len(prompts), "sha256": digest},
            "sampling": {"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens, "seed": SEED,
                         "max_prompt_len": cfg.max_prompt_len},
            "judge": reward_dir, "reference": "sft", "models": models}
