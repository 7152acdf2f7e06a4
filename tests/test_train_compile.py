"""The engine builder's compile and offload options, on real DeepSpeed engines in this process (one rank, gloo).

No Ray: ``build_engine`` is exactly what every Ray Train worker calls, and a one-rank process group keeps each
check to seconds (a Ray fit costs ~40 s before the first step). The Ray runs with offload and HF export are in
``test_train_engine.py``.
"""
from __future__ import annotations

import functools

import pytest
import torch

from cluster.recipe import load_recipe
from pipelines.model import build_model
from pipelines.pretrain.task import lm_step_loss
from pipelines.train.builder import build_engine
from pipelines.train.task import TrainTask

pytestmark = [pytest.mark.deepspeed]

VOCAB = 512
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=128",
        "model.max_seq_len=64", "data.tokenize.seq_len=64", "pretrain.num_workers=1", "pretrain.max_steps=8",
        "pretrain.warmup_steps=2", "pretrain.micro_batch_size=4", "pretrain.lr=0.003", "pretrain.min_lr=0.0003",
        # AdamW unless a test asks for Muon: tiny-cpu's Muon would compile its Newton-Schulz kernels with the
        # model (minutes on CPU), and offload refuses it.
        "pretrain.optimizer=adamw"]


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A one-rank gloo process group, as Ray Train would have made it, torn down afterwards."""
    import torch.distributed as dist

    from pipelines.train.shm import skip_cpu_shm_comm_build

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        store = tmp_path_factory.mktemp("dist") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        skip_cpu_shm_comm_build()
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # wraps the group above
        threads = torch.get_num_threads()
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            dist.destroy_process_group()


def train(*overrides: str, steps: int = 4):
    """Build the engine for the tiny recipe with ``overrides`` and train ``steps`` steps on fixed batches."""
    recipe = load_recipe(None, TINY + list(overrides))
    task = TrainTask(build_model=functools.partial(build_model, recipe.model, VOCAB, 0), loss_fn=lm_step_loss,
                     batches=None)
    torch.manual_seed(0)
    engine = build_engine(task, recipe.pretrain, world_size=1, pipeline_stages=1)
    # One batch of random tokens, seen at every step: its loss can only fall by learning it. (Fresh random
    # batches cannot go below ln(VOCAB), where an untied head's zero-centred logits already start.)
    tokens = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss, _ = lm_step_loss(engine, (tokens[:, :-1], tokens[:, 1:]))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return engine, losses


def test_compiled_engine_trains_like_the_eager_one(one_rank_group):
    # Same weights, data and optimizer: inductor's fused kernels may reorder float sums, nothing more.
    eager, eager_losses = train("pretrain.zero_stage=2")
    compiled, compiled_losses = train("pretrain.zero_stage=2", "pretrain.compile=true")
    assert compiled.is_compiled and not eager.is_compiled
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled_losses[-1] < compiled_losses[0]
    # Compiled in place: the parameter names that checkpoints and the HF export use are unchanged.
    assert list(compiled.module.state_dict()) == list(eager.module.state_dict())
    for name, value in compiled.module.state_dict().items():
        torch.testing.assert_close(value, eager.module.state_dict()[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    ("pretrain.zero_stage=2", "pretrain.offload_optimizer=true"),
    ("pretrain.zero_stage=3", "pretrain.offload_optimizer=true", "pretrain.offload_params=true"),
], ids=["zero2-offload-optimizer", "zero3-offload-params-and-optimizer"])
def test_offload_runs_torch_adamw_without_a_native_build(one_rank_group, overrides):
    # `zero_force_ds_cpu_optimizer: false` lets ZeRO offload step the client's torch AdamW on the CPU copies,
    # so DeepSpeed never JIT-compiles its cpu_adam op (~200 s on this machine).
    _, reference = train("pretrain.zero_stage=2")
    engine, losses = train(*overrides)
    assert engine.zero_offload_optimizer().device == "cpu"
    if "pretrain.offload_params=true" in overrides:
        assert engine.zero_offload_param().device == "cpu"
        assert engine.optimizer.offload_optimizer and engine.optimizer.offload_param
    else:
        assert engine.optimizer.cpu_offload
    assert type(engine.optimizer.optimizer) is torch.optim.AdamW  # not DeepSpeedCPUAdam
    assert losses == pytest.approx(reference, rel=1e-5)


def train_through_loop(*overrides: str, steps: int = 4):
    """As ``train``, through the loop's ``train_step`` (which keeps DeepSpeed's Muon kernels eager)."""
    from pipelines.train.loop import train_step

    recipe = load_recipe(None, TINY + list(overrides))
    task = TrainTask(build_model=functools.partial(build_model, recipe.model, VOCAB, 0), loss_fn=lm_step_loss,
                     batches=None)
    torch.manual_seed(0)
    engine = build_engine(task, recipe.pretrain, world_size=1, pipeline_stages=1)
    tokens = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(0))  # one batch, as train's
    stream = iter([(tokens[:, :-1], tokens[:, 1:])] * steps)
    return engine, [train_step(engine, task, stream, recipe.pretrain, pipeline=False)[0] for _ in range(steps)]


def test_muon_trains_the_same_under_every_zero_stage(one_rank_group):
    # DeepSpeed's MuonWithAuxAdam: ZeRO-1/2/3 orthogonalize each block matrix's full gradient before
    # partitioning it, ZeRO-0 in the optimizer's step; all four must take the same steps.
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    runs = {stage: train_through_loop("pretrain.optimizer=muon", f"pretrain.zero_stage={stage}")
            for stage in (0, 1, 2, 3)}
    engine, reference = runs[0]
    assert isinstance(engine.optimizer, MuonWithAuxAdam)
    muon = {name for name, p in engine.module.named_parameters() if p.use_muon}
    assert muon and all(name.startswith("layers.") and "norm" not in name for name in muon)
    assert not {"embed.weight", "head.norm.weight"} & muon
    assert reference[-1] < reference[0]
    for stage, (_, losses) in runs.items():
        assert losses == pytest.approx(reference, rel=1e-4), f"zero_stage={stage}"
    _, adamw = train_through_loop("pretrain.zero_stage=2")  # TINY's AdamW
    assert adamw != pytest.approx(reference, rel=1e-4)  # the optimizer option took effect
