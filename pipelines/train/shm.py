"""Keep DeepSpeed from JIT-compiling an op that CPU training never uses."""
from __future__ import annotations


def skip_cpu_shm_comm_build() -> None:
    """Make ``deepspeed.comm.torch.build_shm_op`` return None when the accelerator is the CPU.

    Why: every ``deepspeed.init_distributed``/``initialize`` on CPU builds the ``deepspeed_shm_comm`` C++ op
    (1.5-3 minutes of compile on a fresh machine), yet only DeepSpeed-inference's shared-memory all-reduce
    uses it; training communicates through torch.distributed (gloo). Without the op DeepSpeed falls back to
    torch.distributed, which it already does for every collective we use. Idempotent; call it before
    ``deepspeed.init_distributed``/``deepspeed.initialize`` in each process. No effect on GPU.
    """
    import importlib

    from deepspeed.accelerator import get_accelerator

    # `import deepspeed.comm.torch as m` would bind torch itself (deepspeed.comm re-exports the name `torch`).
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")

    if get_accelerator().device_name() != "cpu" or getattr(ds_torch_comm.build_shm_op, "_raylm_skip", False):
        return
    original = ds_torch_comm.build_shm_op

    def build_shm_op():
        return None if get_accelerator().device_name() == "cpu" else original()

    build_shm_op._raylm_skip = True
    ds_torch_comm.build_shm_op = build_shm_op
