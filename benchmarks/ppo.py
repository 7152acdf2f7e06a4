"""PPO throughput: raylm's Ray-actor PPO against TRL's ``PPOTrainer`` (the baseline), same run, same models.

Both sides get the same tiny LLaMA (the default recipe's shape: dim 128, 4 layers) as policy/reference, the same
reward model (its body + a scalar head) as reward/value model, the same prompts (built-in questions), prompt
length, response length, rollout batch, optimizer micro-batch and number of PPO iterations. Reported: samples/s
over the timed iterations (setup excluded on both sides), the time split, and the ratio raylm / TRL.

TRL removed PPO after 1.12.0 (``trl.experimental.ppo``; 1.13.0 has none), so the baseline runs in its own
virtualenv that reuses this project's torch/transformers (a .pth file) and adds trl==1.12.0 + datasets:

    .venv/bin/python benchmarks/ppo.py --setup-trl      # once: ~/.cache/raylm/trl-venv (~20 s)
    .venv/bin/python benchmarks/ppo.py                  # ~3-6 min on 2 cores

Responses are generated without an EOS stop on both sides (every response is exactly ``--response-len`` tokens)
so both do the same work.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_VERSION = "1.12.0"  # the last TRL release with PPOTrainer
DEFAULT_TRL_ENV = Path.home() / ".cache" / "raylm" / "trl-venv"


def setup_trl_env(env: Path, version: str = TRL_VERSION) -> None:
    """A venv that sees this project's packages (a .pth file: the same torch/transformers kernels) plus TRL."""
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    py = env / "bin" / "python"
    site_dir = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                              capture_output=True, text=True).stdout.strip()
    ours = next(p for p in sys.path if p.endswith("site-packages"))
    Path(site_dir, "raylm-main.pth").write_text(ours + "\n")  # reuse torch/transformers: same kernels
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"trl=={version}", "datasets>=4.7"], check=True)


def build_models(root: Path, vocab_size: int) -> tuple[Path, Path, list[list[int]], int]:
    sys.path.insert(0, str(ROOT))
    from cluster.recipe import load_recipe
    from pipelines.chat.builtin_qa import builtin_pairs
    from pipelines.hf_export import export_hf
    from pipelines.hf_models import init_reward_model
    from pipelines.model import build_model
    from pipelines.tokenizer import train_tokenizer

    pairs = builtin_pairs()
    tok = train_tokenizer([f"{p.question} {p.answer}" for p in pairs] * 2, root / "tok", vocab_size=vocab_size)
    cfg = load_recipe().model
    export_hf(build_model(cfg, len(tok), seed=0).state_dict(), cfg, len(tok), root / "tok", root / "policy")
    init_reward_model(root / "policy").save_pretrained(root / "reward")
    tok.save_pretrained(root / "reward")
    prompts = [tok.apply_chat_template([{"role": "user", "content": p.question}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"] for p in pairs]
    return root / "policy", root / "reward", prompts, tok.pad_token_id


def run_raylm(args, policy: Path, reward: Path, prompts: list[list[int]]) -> dict:
    sys.path.insert(0, str(ROOT))
    from actors.ppo.driver import PPOTrainer
    from cluster.recipe import RayConfig
    from cluster.runtime import init_ray
    from cluster.schemas.rlhf import PPOConfig

    init_ray(RayConfig(num_cpus=os.cpu_count()))
    cfg = PPOConfig(rollout_batch_size=args.batch, micro_batch_size=args.micro_batch, max_new_tokens=args.response_len,
                    iterations=args.iterations, actor_lr=1e-5, critic_lr=1e-5, zero_stage=args.zero_stage,
                    stop_at_eos=False)
    trainer = PPOTrainer(cfg, str(policy), str(reward), pad_id=args.pad_id)
    try:
        trainer.step(prompts[:args.batch])  # warm-up iteration (not timed), as TRL's first step is not either
        steps, t0 = [], time.perf_counter()
        for i in range(args.iterations):
            start = (i + 1) * args.batch % (len(prompts) - args.batch)
            steps.append(trainer.step(prompts[start:start + args.batch]))
        seconds = time.perf_counter() - t0
    finally:
        trainer.shutdown()
    split = {k: sum(s[k] for s in steps) for k in ("time_generate", "time_score", "time_train", "time_sync")}
    return {"samples_per_s": args.batch * args.iterations / seconds, "seconds": seconds, **split,
            "response_len": sum(s["response_len"] for s in steps) / len(steps)}


def trl_worker(args) -> None:
    """Runs inside the TRL venv: one PPOTrainer over the same models; prints a JSON line."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(args.threads)
    prompts = json.loads(Path(args.trl_worker, "prompts.json").read_text())
    tok = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    n = args.batch * (args.iterations + 1)
    data = Dataset.from_dict({"input_ids": [prompts[i % len(prompts)] for i in range(n)]})

    class StepTimer(TrainerCallback):  # the first PPO batch is the warm-up, as on the raylm side
        def __init__(self):
            self.marks = []

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

    timer = StepTimer()
    config = PPOConfig(output_dir=str(Path(args.trl_worker, "out")), per_device_train_batch_size=args.micro_batch,
                       gradient_accumulation_steps=args.batch // args.micro_batch, num_mini_batches=1,
                       num_ppo_epochs=1, total_episodes=n, response_length=args.response_len, stop_token=None,
                       learning_rate=1e-5, local_rollout_forward_batch_size=args.batch, num_sample_generations=0,
                       report_to=[], save_strategy="no", logging_steps=10**6, use_cpu=True, seed=0,
                       missing_eos_penalty=None, kl_coef=0.05, temperature=1.0, disable_tqdm=True)
    trainer = PPOTrainer(args=config, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(args.policy),
                         ref_model=AutoModelForCausalLM.from_pretrained(args.policy),
                         reward_model=AutoModelForSequenceClassification.from_pretrained(args.reward),
                         value_model=AutoModelForSequenceClassification.from_pretrained(args.reward),
                         train_dataset=data, callbacks=[timer])
    trainer.train()
    timed = timer.marks[-1] - timer.marks[0]
    print("TRL_RESULT " + json.dumps({"samples_per_s": args.batch * (len(timer.marks) - 1) / timed,
                                      "seconds": timed, "threads": args.threads}))


def run_trl(args, policy: Path, reward: Path, prompts: list[list[int]], work: Path, threads: int) -> dict:
    python = Path(args.trl_env) / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no TRL environment at {args.trl_env}: run `{sys.argv[0]} --setup-trl` first")
    (work / "prompts.json").write_text(json.dumps(prompts))
    cmd = [str(python), __file__, "--trl-worker", str(work), "--policy", str(policy), "--reward", str(reward),
           "--batch", str(args.batch), "--micro-batch", str(args.micro_batch), "--response-len",
           str(args.response_len), "--iterations", str(args.iterations), "--threads", str(threads)]
    return run_trl_worker(cmd)


def run_trl_worker(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run a TRL worker (in TRL's own venv) and return the JSON of its last ``TRL_RESULT`` line."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    lines = [x for x in out.stdout.splitlines() if x.startswith("TRL_RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"TRL run failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=4, help="timed PPO iterations (after one warm-up)")
    p.add_argument("--batch", type=int, default=16, help="rollouts per iteration")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--trl-env", default=str(DEFAULT_TRL_ENV))
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--setup-trl", action="store_true", help=f"create the TRL {TRL_VERSION} venv and exit")
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    p.add_argument("--policy", help=argparse.SUPPRESS)
    p.add_argument("--reward", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        return trl_worker(args)
    if args.setup_trl:
        return setup_trl_env(Path(args.trl_env))
    with tempfile.TemporaryDirectory(prefix="raylm-ppo-bench-") as tmp:
        work = Path(tmp)
        policy, reward, prompts, args.pad_id = build_models(work, vocab_size=1024)
        ours = run_raylm(args, policy, reward, prompts)
        # One process for TRL: with 1 torch thread and with one per core; the faster is the baseline (with
        # other work on the machine, 2 spinning OpenMP threads can be much slower than 1).
        trl_runs = [run_trl(args, policy, reward, prompts, work, t) for t in sorted({1, os.cpu_count() or 1})]
        trl = max(trl_runs, key=lambda r: r["samples_per_s"])
    print(f"PPO, tiny LLaMA (dim 128, 4 layers), rollout batch {args.batch}, response {args.response_len} tokens, "
          f"{args.iterations} timed iterations, {os.cpu_count()} CPUs")
    for r in trl_runs:
        print(f"  TRL {TRL_VERSION} PPOTrainer, {r['threads']} torch thread(s): {r['samples_per_s']:.2f} samples/s "
              f"({r['seconds']:.1f} s)")
    print(f"  baseline = TRL with {trl['threads']} thread(s): {trl['samples_per_s']:.2f} samples/s")
    print(f"  raylm Ray-actor PPO:                  {ours['samples_per_s']:.2f} samples/s ({ours['seconds']:.1f} s; "
          f"generate {ours['time_generate']:.1f} s, score {ours['time_score']:.1f} s, "
          f"train {ours['time_train']:.1f} s, sync {ours['time_sync']:.1f} s)")
    print(f"  ratio raylm / TRL: {ours['samples_per_s'] / trl['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
