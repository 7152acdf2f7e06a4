"""GRPO throughput: raylm's Ray-actor GRPO against TRL's ``GRPOTrainer`` (current release), same run, same work.

TRL deleted its PPO trainer in 2026; ``GRPOTrainer`` is what its users run now. Both sides get the same tiny
LLaMA (the default recipe's shape) as policy and reference, the built-in arithmetic task's prompts ("What is
3 + 4?", rendered by the same chat template) and its rule reward (``pipelines.tasks.arithmetic:correct``, no
reward model), the same group size, rollout batch, micro-batch, response length, KL coefficient (k3 estimator
in the loss, TRL's ``beta``), one optimisation pass per batch and the same number of iterations. Reported:
samples/s over the timed iterations (one warm-up excluded on both sides) and the ratio raylm / TRL.

Both get the machine's CPUs: TRL one process (1 torch thread, and one per core; the faster counts), raylm
its actors, all in the same number of Ray CPUs and at the same scheduling priority as TRL's process (Ray
workers run at niceness 15 unless told otherwise), in two layouts (``--layouts``): on-policy, 2 data-parallel
policy replicas that sample their shards, each with its reference beside it; overlap (``ppo.async_rollout``),
one transformers rollout engine sampling the next batch while one policy replica trains (one-step
off-policy: a different algorithm from TRL's, so reported apart). Both have a reward actor.

TRL runs in its own virtualenv that reuses this project's torch/transformers (a .pth file) and adds the pinned
TRL release + datasets (``benchmarks/ppo.py`` keeps TRL 1.12 for PPO in another one):

    .venv/bin/python benchmarks/grpo.py --setup-trl      # once: ~/.cache/raylm/trl-grpo-venv (~30 s)
    .venv/bin/python benchmarks/grpo.py                  # ~3 min on 2 cores

Fairness settings on TRL's side (its defaults target GPUs): fp32 (``bf16=False``; bf16 is ~10x slower on this
CPU), no gradient checkpointing (raylm's policy has none), EOS suppressed on both sides (``min_new_tokens``
there, ``ppo.stop_at_eos=false`` here) so every response is exactly ``--response-len`` tokens. One optimizer
step per batch on both sides (TRL accumulates its micro-batches; raylm ``ppo.mini_batch_size`` = the batch),
so neither computes the rollout ("old") log-probs on-policy. raylm runs without ZeRO (``ppo.zero_stage=0``,
as TRL's one process) and with ``ppo.compile_decode`` (``--no-compile-decode`` to turn it off; compiled in
the untimed warm-up iteration). Each side's CPU time per timed iteration is printed too (raylm: every
process of its run, Ray's included), with the ceiling it sets on the ratio: C CPUs x TRL's / raylm's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.ppo import run_trl_worker, setup_trl_env

TRL_VERSION = "1.16.0"  # the current TRL release when this benchmark was written (2026-12-03)
DEFAULT_TRL_ENV = Path.home() / ".cache" / "raylm" / "trl-grpo-venv"
REWARD = "pipelines.tasks.arithmetic:correct"
LAYOUTS = {"on-policy": False, "overlap": True}  # name -> ppo.async_rollout


def build_model(root: Path, vocab_size: int) -> tuple[Path, list[str], list[list[int]], int]:
    """A random-init policy of the default recipe's shape; the arithmetic questions and their prompt ids."""
    from transformers import AutoModelForCausalLM

    from cluster.recipe import load_recipe
    from pipelines.chat.builtin_qa import builtin_pairs
    from pipelines.hf_export import export_hf
    from pipelines.model import build_model as build_llama
    from pipelines.tasks.arithmetic import demonstrations, problems, question
    from pipelines.tokenizer import train_tokenizer

    texts = [f"{p.question} {p.answer}" for p in builtin_pairs()]
    texts += [f"{d['prompt']} {d['response']}" for d in demonstrations(copies=2)]
    tok = train_tokenizer(texts, root / "tok", vocab_size=vocab_size)
    cfg = load_recipe().model
    export_hf(build_llama(cfg, len(tok), seed=0).state_dict(), cfg, len(tok), root / "tok", root / "policy")
    # TRL builds its reference model from config.json's ``architectures``, which export_hf's config lacks;
    # transformers' own save writes it.
    AutoModelForCausalLM.from_pretrained(root / "policy").save_pretrained(root / "policy")
    questions = [question(a, b) for a, b in problems()]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"] for q in questions]
    return root / "policy", questions, prompts, tok.pad_token_id


def cpu_seconds_of_this_process_tree() -> float:
    """CPU time (user + system) of this process and every live descendant: the driver, Ray's own processes and
    the actors. Against TRL's one process it bounds the ratio: on C cores raylm cannot beat its CPU per
    iteration / C, so the ratio is at most C x TRL's CPU per iteration / raylm's."""
    import psutil

    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def grpo_config(args, overlap: bool):
    from cluster.schemas.rlhf import PPOConfig, RoleConfig

    # On-policy: ``--replicas`` data-parallel policy replicas, each sampling its shard and with its reference in
    # the same bundle. Overlapped: one policy replica (its reference beside it) trains while one transformers
    # rollout engine samples the next batch (``ppo.async_rollout``). One reward actor in a half-size bundle (it
    # only decodes and runs a regex). All fitted into the machine's CPUs.
    replicas = 1 if overlap else args.replicas
    bundle = 0.999 * (os.cpu_count() or 1) / (replicas + overlap + 0.5)
    engine = {"rollout_engine": "hf_engine", "async_rollout": True, "rollout": RoleConfig(num_cpus=bundle)} if overlap else {}
    return PPOConfig(policy=RoleConfig(replicas=replicas, num_cpus=bundle),
                     reference=RoleConfig(replicas=replicas, num_cpus=bundle), **engine,
                     reward=RoleConfig(num_cpus=bundle / 2), algorithm="grpo", rollout_batch_size=args.batch, group_size=args.group_size,
                     micro_batch_size=args.micro_batch, mini_batch_size=args.batch, max_new_tokens=args.response_len, iterations=args.iterations,
                     actor_lr=1e-5, stop_at_eos=False, kl_mode="loss", kl_estimator="k3", adaptive_kl=False,
                     kl_coef=args.beta, reward_functions=[REWARD], use_reward_model=False,
                     # No ZeRO partitioning (``ppo.zero_stage=0``): plain data parallelism, as TRL's single
                     # process has none; ZeRO-2 cost ~14 ms more per 16-row update of this 1 M-parameter model.
                     zero_stage=0, compile_decode=args.compile_decode)


def run_raylm(args, policy: Path, prompts: list[list[int]], overlap: bool = False) -> dict:
    from actors.ppo.driver import PPOTrainer
    from actors.ppo.reward_functions import load_reward_functions
    from cluster.recipe import RayConfig
    from cluster.runtime import init_ray

    cfg = grpo_config(args, overlap)
    # Ray starts its workers at niceness 15; TRL's process runs at 0. On a machine shared with other work that
    # alone starved the actors (raylm 3.6 vs TRL 15.4 samples/s under a load average of ~50): run both at 0.
    os.environ["RAY_worker_niceness"] = "0"
    init_ray(RayConfig(num_cpus=os.cpu_count()))
    trainer = PPOTrainer(cfg, str(policy), None, pad_id=args.pad_id, reward_functions=load_reward_functions([REWARD]))
    per_iter = args.batch // args.group_size

    def batch(i: int) -> list[list[int]]:
        chosen = [prompts[(i * per_iter + j) % len(prompts)] for j in range(per_iter)]
        return [p for p in chosen for _ in range(args.group_size)]  # a group = consecutive samples

    # As raylm's loop does: with async_rollout the next iteration's prompts go with this one's.
    following = (lambda i: batch(i + 1) if i < args.iterations else None) if overlap else (lambda i: None)
    try:
        trainer.step(batch(0), following(0))  # warm-up iteration (not timed), as TRL's first step is not either
        steps, t0, cpu0 = [], time.perf_counter(), cpu_seconds_of_this_process_tree()
        for i in range(1, args.iterations + 1):
            steps.append(trainer.step(batch(i), following(i)))
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds_of_this_process_tree() - cpu0
    finally:
        trainer.shutdown()
        import ray

        ray.shutdown()  # each layout on a fresh cluster
    split = {k: sum(s[k] for s in steps) for k in ("time_generate", "time_score", "time_train", "time_sync")}
    return {"samples_per_s": args.batch * args.iterations / seconds, "seconds": seconds, **split,
            "cpu_ms_per_iteration": 1000 * cpu / args.iterations,
            "response_len": sum(s["response_len"] for s in steps) / len(steps)}


def trl_worker(args) -> None:
    """Runs inside the TRL venv: one GRPOTrainer over the same model and task; prints a JSON line."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from pipelines.tasks.arithmetic import correct

    torch.set_num_threads(args.threads)
    questions = json.loads(Path(args.trl_worker, "questions.json").read_text())
    tok = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    per_iter = args.batch // args.group_size
    n = per_iter * (args.iterations + 1)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": questions[i % len(questions)]}]
                                         for i in range(n)]})

    def arithmetic(prompts, completions, **_):  # TRL's reward_funcs signature around the very same rule
        return correct([p[-1]["content"] for p in prompts], [c[0]["content"] for c in completions])

    class StepTimer(TrainerCallback):  # one optimizer step per generation batch; the first is the warm-up
        def __init__(self):
            self.marks = []

        def on_step_end(self, *a, **k):
            self.marks.append((time.perf_counter(), time.process_time()))  # wall, CPU of the process

    timer = StepTimer()
    config = GRPOConfig(output_dir=str(Path(args.trl_worker, "out")), per_device_train_batch_size=args.micro_batch,
                        gradient_accumulation_steps=args.batch // args.micro_batch, num_generations=args.group_size,
                        max_completion_length=args.response_len, generation_kwargs={"min_new_tokens": args.response_len},
                        max_steps=args.iterations + 1, num_iterations=1, beta=args.beta, learning_rate=1e-5,
                        temperature=1.0, top_p=1.0, bf16=False, gradient_checkpointing=False, use_cpu=True, seed=0,
                        report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(args.policy), reward_funcs=arithmetic,
                          args=config, train_dataset=data, processing_class=tok, callbacks=[timer])
    trainer.train()
    (start, cpu0), (end, cpu1) = timer.marks[0], timer.marks[-1]
    steps = len(timer.marks) - 1
    print("TRL_RESULT " + json.dumps({"samples_per_s": args.batch * steps / (end - start), "seconds": end - start,
                                      "cpu_ms_per_iteration": 1000 * (cpu1 - cpu0) / steps, "threads": args.threads}))


def run_trl(args, policy: Path, questions: list[str], work: Path, threads: int) -> dict:
    python = Path(args.trl_env) / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no TRL environment at {args.trl_env}: run `{sys.argv[0]} --setup-trl` first")
    (work / "questions.json").write_text(json.dumps(questions))
    cmd = [str(python), __file__, "--trl-worker", str(work), "--policy", str(policy), "--batch", str(args.batch),
           "--group-size", str(args.group_size), "--micro-batch", str(args.micro_batch), "--response-len",
           str(args.response_len), "--iterations", str(args.iterations), "--beta", str(args.beta),
           "--threads", str(threads)]
    return run_trl_worker(cmd, {"PYTHONPATH": str(ROOT)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=12, help="timed GRPO iterations (after one warm-up)")
    p.add_argument("--batch", type=int, default=32, help="samples per iteration (prompts x group size)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--replicas", type=int, default=2, help="raylm's data-parallel policy (and reference) replicas")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help="raylm layouts to run: on-policy (data-parallel policy replicas sample), overlap "
                        "(ppo.async_rollout: a rollout engine samples the next batch while the policy trains)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (k3, in the loss) on both sides")
    p.add_argument("--compile-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="raylm's ppo.compile_decode (the sampling step compiled during the warm-up iteration)")
    p.add_argument("--trl-env", default=str(DEFAULT_TRL_ENV))
    p.add_argument("--trl-threads", default=f"1,{os.cpu_count() or 1}", help="torch thread counts to run TRL with")
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--setup-trl", action="store_true", help=f"create the TRL {TRL_VERSION} venv and exit")
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    p.add_argument("--policy", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        return trl_worker(args)
    if args.setup_trl:
        return setup_trl_env(Path(args.trl_env), TRL_VERSION)
    with tempfile.TemporaryDirectory(prefix="raylm-grpo-bench-") as tmp:
        work = Path(tmp)
        policy, questions, prompts, args.pad_id = build_model(work, vocab_size=1024)
        ours = {}
        for layout in args.layouts.split(","):
            ours[layout] = run_raylm(args, policy, prompts, overlap=LAYOUTS[layout])
            print(f"raylm {layout}: {ours[layout]['samples_per_s']:.2f} samples/s", flush=True)
        # TRL with 1 torch thread and with one per core by default; the faster is the baseline (on a busy
        # machine 2 spinning OpenMP threads can be much slower than 1).
        trl_runs = [run_trl(args, policy, questions, work, int(t)) for t in args.trl_threads.split(",")]
        trl = max(trl_runs, key=lambda r: r["samples_per_s"])
    print(f"GRPO, tiny LLaMA (default recipe shape), arithmetic prompts, {args.batch // args.group_size} prompts x "
          f"group {args.group_size} = {args.batch} samples/iteration, response {args.response_len} tokens, "
          f"micro-batch {args.micro_batch}, beta {args.beta}, {args.iterations} timed iterations, {os.cpu_count()} CPUs; "
          f"raylm ppo.zero_stage=0 ppo.compile_decode={args.compile_decode}, TRL fp32 without gradient checkpointing, EOS suppressed on both sides")
    for r in trl_runs:
        print(f"  TRL {TRL_VERSION} GRPOTrainer, {r['threads']} torch thread(s): {r['samples_per_s']:.2f} samples/s "
              f"({r['seconds']:.1f} s; CPU {r['cpu_ms_per_iteration']:.0f} ms per iteration)")
    print(f"  baseline = TRL with {trl['threads']} thread(s): {trl['samples_per_s']:.2f} samples/s")
    for layout, r in ours.items():
        print(f"  raylm GRPO, {layout + ':':<10} {r['samples_per_s']:.2f} samples/s ({r['seconds']:.1f} s; "
              f"generate {r['time_generate']:.1f} s, score {r['time_score']:.1f} s, "
              f"train {r['time_train']:.1f} s, sync {r['time_sync']:.1f} s; CPU {r['cpu_ms_per_iteration']:.0f} ms "
              f"per iteration, all processes)  "
              f"ratio raylm / TRL: {r['samples_per_s'] / trl['samples_per_s']:.2f}x (at most "
              f"{os.cpu_count()} CPUs x TRL's CPU / raylm's = "
              f"{(os.cpu_count() or 1) * trl['cpu_ms_per_iteration'] / r['cpu_ms_per_iteration']:.2f}x)")


if __name__ == "__main__":
    main()
