"""A verifiable task, built in: single-digit addition ("What is 3 + 4?"), with a reward checked by rule.

``python -m pipelines.tasks.arithmetic OUT_DIR`` writes two files:

- ``OUT_DIR/sft.jsonl``: weak demonstrations, ``{"prompt", "response": "The answer is N."}``, where N is right
  only ``correct_fraction`` of the time (default half; else another digit sum, uniformly). SFT on them
  teaches the format and leaves the model unsure of the sums: a policy with a low success rate that RL can
  raise. (With 30% right answers the tiny default model learned no sum at all in 400 SFT steps: the same
  answer distribution for every question, which RL cannot lift either; with half it conditions on them.)
- ``OUT_DIR/prompts.jsonl``: every problem once (100: ten per sum 0-9), the PPO/GRPO prompts.

``correct`` is the reward function (``ppo.reward_functions: [pipelines.tasks.arithmetic:correct]``): 1.0 when
the first integer of the response is the sum, else 0.0; its mean over a batch is the success rate.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from cluster.config import atomic_write_text

QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")
INTEGER = re.compile(r"-?\d+")


def problems(max_sum: int = 9, per_sum: int = 10) -> list[tuple[int, int]]:
    """Digit pairs (a, b), ``per_sum`` of them for each sum 0..``max_sum`` (the s + 1 pairs of sum s, cycled).

    Every answer is equally common, so answering one constant scores 1 / (max_sum + 1): a policy can only do
    better by reading the question. (Over all 55 pairs the sums 6-9 are 62% of the problems, and a PPO policy
    did learn to answer 6, 7 or 9 to most questions.)"""
    return [(a, s - a) for s in range(max_sum + 1) for a in (list(range(s + 1)) * per_sum)[:per_sum]]


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def demonstrations(copies: int = 11, correct_fraction: float = 0.5, max_sum: int = 9, seed: int = 0
                   ) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for a, b in problems(max_sum):
        for _ in range(copies):
            wrong = [s for s in range(max_sum + 1) if s != a + b]
            answer = a + b if rng.random() < correct_fraction else rng.choice(wrong)
            out.append({"prompt": question(a, b), "response": f"The answer is {answer}."})
    rng.shuffle(out)
    return out


def correct(prompts: list[str], responses: list[str]) -> list[float | None]:
    """1.0 if the response's first integer is the sum asked for, else 0.0; None for a prompt of another task."""
    out: list[float | None] = []
    for prompt, response in zip(prompts, responses):
        asked = QUESTION.search(prompt)
        if asked is None:
            out.append(None)
            continue
        given = INTEGER.search(response)
        out.append(float(given is not None and int(given.group()) == int(asked[1]) + int(asked[2])))
    return out


def write_task(out_dir: str | Path, copies: int = 11, correct_fraction: float = 0.5, seed: int = 0) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = lambda records: "".join(json.dumps(r) + "\n" for r in records)
    demos = demonstrations(copies, correct_fraction, seed=seed)
    atomic_write_text(out_dir / "sft.jsonl", lines(demos))
    atomic_write_text(out_dir / "prompts.jsonl", lines({"prompt": question(a, b)} for a, b in problems()))
    return {"sft": str(out_dir / "sft.jsonl"), "prompts": str(out_dir / "prompts.jsonl"), "demonstrations": len(demos)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--copies", type=int, default=11, help="demonstrations per problem")
    parser.add_argument("--correct-fraction", type=float, default=0.5, help="share of right answers in them")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(write_task(args.out_dir, args.copies, args.correct_fraction, args.seed)))


if __name__ == "__main__":
    main()
