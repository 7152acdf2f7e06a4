"""Fast unit tests of the training engine's pure parts (no Ray, no DeepSpeed engines)."""
import itertools
import json
import math

import pytest
import torch

from cluster.schemas.train import TrainConfig
from pipelines.train.data import BatchStream
from pipelines.train.ds_config import build_ds_config, deep_merge
from pipelines.train.engine import summarize
from pipelines.train.schedule import lr_at, warmup_cosine
from pipelines.train.task import TrainTask


def test_lr_warms_up_linearly_then_decays_to_min_lr():
    lrs = [lr_at(s, 1.0, 0.1, 4, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lr_at(20, 1.0, 0.1, 4, 20) == pytest.approx(0.1)
    assert lr_at(50, 1.0, 0.1, 4, 20) == pytest.approx(0.1)  # never climbs back up
    assert lr_at(0, 1.0, 0.1, 0, 10) == pytest.approx(1.0)  # no warmup: full lr at once


def test_lambda_scheduler_follows_lr_at():
    cfg = TrainConfig(lr=2e-3, min_lr=2e-4, warmup_steps=3, max_steps=10)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched = warmup_cosine(opt, cfg)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, 2e-3, 2e-4, 3, 10) for s in range(10)])


def test_ds_config_is_derived_from_the_recipe():
    cfg = TrainConfig(zero_stage=3, micro_batch_size=4, grad_accum=2, grad_clip=0.5, precision="bf16",
                      offload_optimizer=True)
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 4 * 2 * 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "optimizer" not in ds  # torch AdamW from the client: no FusedAdam compile
    assert build_ds_config(TrainConfig(zero_stage=1), 4, pipeline_stages=2)["train_batch_size"] == 4 * 1 * 2


def test_expert_json_overrides_nested_keys(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 5}))
    ds = build_ds_config(TrainConfig(zero_stage=2, deepspeed_config=str(path)), 2)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert ds["steps_per_print"] == 5
    assert deep_merge({"a": {"b": 1}}, {"a": 2}) == {"a": 2}


@pytest.mark.parametrize("text, reason", [(None, "not found"), ("{oops", "not valid JSON"), ("[1]", "JSON object")])
def test_bad_expert_json_names_the_key_and_file(tmp_path, text, reason):
    path = tmp_path / "ds.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=rf"deepspeed_config: .*{reason}"):
        build_ds_config(TrainConfig(deepspeed_config=str(path)), 2)


def _numbered(split, rank, world, epoch):
    for i in range(3):
        yield torch.tensor([[epoch, rank, i]])


def _empty(split, rank, world, epoch):
    return iter(())


def test_batch_stream_resumes_at_the_next_micro_batch_across_epochs():
    task = TrainTask(build_model=None, loss_fn=None, batches=_numbered)
    full = BatchStream(task, "train", 1, 2, torch.device("cpu"))
    expected = [next(full).tolist() for _ in range(7)]
    first = BatchStream(task, "train", 1, 2, torch.device("cpu"))
    head = [next(first).tolist() for _ in range(4)]
    resumed = BatchStream(task, "train", 1, 2, torch.device("cpu"), epoch=first.epoch, index=first.index)
    assert head + [next(resumed).tolist() for _ in range(3)] == expected
    assert expected[3] == [[1, 1, 0]] and full.tokens == 7 * 3


def test_batch_stream_without_data_names_the_rank():
    stream = BatchStream(TrainTask(build_model=None, loss_fn=None, batches=_empty), "train", 1, 2,
                         torch.device("cpu"))
    with pytest.raises(ValueError, match="no batches for data rank 1 of 2"):
        next(stream)


def test_summary_keeps_the_last_record_of_each_step(tmp_path):
    lines = [{"step": 1, "loss": 5.0, "tokens_per_s": 10}, {"step": 2, "loss": 4.0, "tokens_per_s": 30},
             {"step": 2, "loss": 3.0, "tokens_per_s": 20, "val_loss": 2.0}]  # step 2 re-run after a restart
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = summarize(tmp_path, "ckpt")
    assert summary["steps"] == 2 and summary["loss"] == 3.0 and summary["val_loss"] == 2.0
    assert summary["val_ppl"] == pytest.approx(math.exp(2.0), abs=0.01)
    assert summary["tokens_per_s"] == 20


def test_compile_is_a_typed_recipe_key_and_the_gpu_recipe_enables_it():
    from cluster.config import ConfigError
    from cluster.recipe import PROJECT_ROOT, load_recipe

    assert load_recipe(None, ["pretrain.compile=true"]).pretrain.compile
    assert not load_recipe(None).pretrain.compile  # CPU default: a compile costs more than 200 tiny steps gain
    assert load_recipe(PROJECT_ROOT / "configs" / "gpt-125m-gpu.yaml").pretrain.compile
    with pytest.raises((ConfigError, ValueError), match="compile"):
        load_recipe(None, ["pretrain.compile=fast"])


def test_pipeline_stages_are_balanced_on_compute_not_parameters():
    from deepspeed.runtime.utils import partition_balanced

    from cluster.recipe import load_recipe
    from pipelines.model import build_model, flops_per_token, layer_flops_per_token

    recipe = load_recipe(None, ["model.tie_embeddings=false"])  # tiny-cpu: 4 blocks, vocab 4096, seq 255
    costs = layer_flops_per_token(recipe.model, 4096, 255)
    assert sum(costs) == flops_per_token(recipe.model, 4096, 255)
    assert costs[0] == 0 and costs[-1] > costs[1]  # the embedding is a lookup; the LM head outweighs a block
    # [embedding, 3 blocks | 1 block, head]: DeepSpeed's parameter balance gave [embedding, 2 | 2, head], which
    # left the second stage twice the first one's work.
    assert list(partition_balanced(costs, 2)) == [0, 4, 6]
    params = [sum(p.numel() for p in layer.parameters()) for layer in build_model(recipe.model, 4096, 0).as_layers()]
    assert list(partition_balanced(params, 2)) == [0, 3, 6]


class _RunsCode:
    """A pickle that calls a function of the file's choosing when loaded (what a planted checkpoint does)."""

    def __reduce__(self):
        return (print, ("planted code ran",))


def test_checkpoint_loads_refuse_code_but_restore_rng_exactly(tmp_path):
    import random

    import numpy as np

    from pipelines.train.checkpoint import rng_state, set_rng_state, weights_only_loads

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "state.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected

    torch.save({"x": _RunsCode()}, tmp_path / "planted.pt")
    with weights_only_loads(), pytest.raises(Exception, match="Unsupported global"):
        torch.load(tmp_path / "planted.pt", weights_only=False)  # as DeepSpeed calls it
