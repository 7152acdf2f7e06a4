"""Building one rank's DeepSpeed engine from a ``TrainTask`` and a ``TrainConfig`` (no Ray needed here, so
benchmarks can build the very same engine in a plain process)."""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from cluster.schemas.train import TrainConfig
from pipelines.train.ds_config import build_ds_config
from pipelines.train.schedule import warmup_cosine
from pipelines.train.task import TrainTask


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices and embeddings, never norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def muon_optimizer(model: torch.nn.Module, cfg: TrainConfig, betas: tuple[float, float]):
    """DeepSpeed's ``MuonWithAuxAdam``: Muon for the matrices inside transformer blocks, torch AdamW for the rest
    (embedding, LM head or value head, norms), as in modded-nanogpt.

    DeepSpeed's class rather than ``torch.optim.Muon``: ZeRO-1/2/3 hand the optimizer flat 1-D partitions, and
    only for this class do they orthogonalize each matrix's full gradient before partitioning (it reads
    ``param.use_muon``, set here). Built by us, not from a config ``{"type": "Muon"}``: DeepSpeed's own tagging
    sends every 2-D weight not named "embed"/"lm_head" to Muon (our head is ``head.output``), and its
    auxiliary Adam would be FusedAdam, a native op compiled for minutes on CPU."""
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    from pipelines.model import Block

    in_blocks = {id(p) for m in model.modules() if isinstance(m, Block) for p in m.parameters() if p.dim() == 2}
    if not in_blocks:
        raise ValueError("optimizer: muon needs a model built of pipelines.model.Block layers")
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.use_muon = id(p) in in_blocks
    return MuonWithAuxAdam(
        [{"params": [p for p in params if p.use_muon], "use_muon": True, "lr": cfg.muon_lr,
          "momentum": cfg.muon_momentum, "weight_decay": cfg.weight_decay},
         *[{**group, "params": [p for p in group["params"] if not p.use_muon], "use_muon": False, "lr": cfg.lr,
            "betas": betas, "eps": 1e-8} for group in param_groups(model, cfg.weight_decay)]],
        adam_optimizer=torch.optim.AdamW)


def cost_balanced_pipeline(layers: list[torch.nn.Module], costs: list[float] | None, **kwargs):
    """A DeepSpeed ``PipelineModule`` whose stages balance ``costs`` (per layer) rather than parameter counts.

    DeepSpeed 0.19 partitions by "parameters", "uniform" or "type:regex" only. Parameters are a poor proxy for
    work here: the embedding holds as many weights as the LM head but costs a lookup, so the parameter split
    gave the last stage twice the first one's compute (tiny-cpu: 73 vs 151 ms per micro-batch) and the whole
    pipeline ran at the slow stage's pace. The subclass feeds ``costs`` to DeepSpeed's own balanced partitioner
    through the hook its "parameters" method calls (``_count_layer_params``).
    """
    from deepspeed.pipe import PipelineModule

    if costs is None:
        return PipelineModule(layers=layers, partition_method="parameters", **kwargs)
    if len(costs) != len(layers):
        raise ValueError(f"pipeline_costs: {len(costs)} costs for {len(layers)} pipeline layers")

    class CostBalancedPipelineModule(PipelineModule):
        def _count_layer_params(self) -> list[float]:
            return list(costs)

    return CostBalancedPipelineModule(layers=layers, partition_method="parameters", **kwargs)


def initialize(model: torch.nn.Module, ds_config: dict, *, lr: float, betas: tuple[float, float] = (0.9, 0.95),
               weight_decay: float = 0.0, on_gpu: bool = False, schedule=None, optimizer=None):
    """A DeepSpeed engine over ``model`` with torch AdamW as the client optimizer (a DeepSpeed config optimizer
    would JIT-compile FusedAdam: minutes on CPU), or ``optimizer`` when given (Muon); ``schedule(optimizer)``
    makes the LR scheduler (None: a constant LR). The one place engines are made: the training stages
    (``build_engine``) and the PPO roles."""
    import deepspeed

    # On GPUs the fused AdamW kernel: one pass over the fp32 master weights where the default (foreach) makes
    # several (+1.6 MFU points on the 125M recipe at 32 x 2 on an H100, docs/pretrain.md). CPU runs keep the
    # default, which the bitwise resume tests pin.
    if optimizer is None:
        optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas,
                                      fused=True if on_gpu else None)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           lr_scheduler=schedule(optimizer) if schedule is not None else None)
    return engine


def build_engine(task: TrainTask, cfg: TrainConfig, world_size: int, pipeline_stages: int):
    model = task.build_model()
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = cfg.activation_checkpointing
    if pipeline_stages > 1:
        if task.pipeline_layers is None or task.pipeline_loss is None:
            raise ValueError("pipeline_stages: this stage's task does not support pipeline parallelism")
        # torch's non-reentrant checkpoint: DeepSpeed's default (reentrant) one fails on the first stage, whose
        # input (token ids) does not require grad ("element 0 of tensors does not require grad").
        model = cost_balanced_pipeline(task.pipeline_layers(model), task.pipeline_costs,
                                       num_stages=pipeline_stages, loss_fn=task.pipeline_loss,
                                       activation_checkpoint_interval=int(cfg.activation_checkpointing),
                                       activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False))
    betas = tuple(cfg.betas) if cfg.betas else (0.9, 0.95)
    engine = initialize(model, build_ds_config(cfg, world_size, pipeline_stages), lr=cfg.lr, betas=betas,
                        weight_decay=cfg.weight_decay, on_gpu=cfg.gpus_per_worker > 0,
                        schedule=functools.partial(warmup_cosine, cfg=cfg),
                        optimizer=muon_optimizer(model, cfg, betas) if cfg.optimizer == "muon" else None)
    if cfg.compile:
        # DeepSpeed's compile (not torch.compile(model) before initialize): it compiles the wrapped module in
        # place (nn.Module.compile), so parameter names, checkpoints and exports are unchanged, and ZeRO-3's
        # gather/release hooks, installed by initialize, stay outside the graphs (DeepSpeed marks them
        # compiler.disable). Plain torch.compile, not DeepCompile, which would JIT-build a native op.
        engine.compile()
    return engine
