"""Programmable rewards (``ppo.reward_functions``): Python functions named in the recipe, each weighted, summed
with (or instead of) the reward model's score, as verl's reward functions and TRL's ``reward_funcs`` are.

A function takes ``prompts`` and ``responses`` (lists of strings: the decoded prompt without special tokens,
and the decoded reply without its EOS) and returns one number per sample; ``None`` for a sample means "no
opinion" and counts 0 (as in TRL). Functions run in the reward actors, on the cluster.

Loading happens in the driver, before any actor starts, so a missing file, module or function fails first,
naming the entry. A function from a file is imported under a private module name and registered with
cloudpickle *by value*: the actors receive its code with their constructor arguments, so only the driver
needs the file (under ``raylm submit``, the job's driver sees the uploaded project). A ``module:function``
travels by reference: the module must be importable on the cluster (the project's own modules are).

Failures: if a call over the batch raises, the function is called once per sample; a sample that raises (or
returns something that is not a finite number) gets 0 from that function and a warning naming the function,
the sample and the error; every other sample keeps its value. A function that fails on every sample of a
batch stops the run (a broken function should not silently train on zeros). A wrong number of values is a
bug in the function and stops the run.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.schemas.rlhf import RewardFunctionSpec


@dataclass
class RewardFunction:
    name: str  # "<file stem or module>:<function>", the metric key reward/<name>
    fn: Callable[[list[str], list[str]], list]
    weight: float


def _import_file(path: Path, entry: str):
    name = f"raylm_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ValueError(f"ppo.reward_functions: {entry!r}: importing {path} failed: {exc!r}") from exc
    return module


def load_reward_functions(entries: list[str], cwd: Path | None = None) -> list[RewardFunction]:
    """Resolve every ``ppo.reward_functions`` entry to a callable; ValueError naming the first bad one."""
    import ray.cloudpickle

    out = []
    for i, entry in enumerate(entries):
        spec = RewardFunctionSpec.parse(entry, f"ppo.reward_functions[{i}]")
        if spec.is_file:
            path = (Path(cwd or Path.cwd()) / spec.source).resolve()
            if not path.is_file():
                raise ValueError(f"ppo.reward_functions: {entry!r}: no such file {path}")
            module = _import_file(path, entry)
            ray.cloudpickle.register_pickle_by_value(module)  # the code travels to the actors by value
            name = f"{path.stem}:{spec.function}"
        else:
            try:
                module = importlib.import_module(spec.source)
            except ImportError as exc:
                raise ValueError(f"ppo.reward_functions: {entry!r}: cannot import module {spec.source!r}: "
                                 f"{exc}") from None
            name = f"{spec.source}:{spec.function}"
        fn = getattr(module, spec.function, None)
        if not callable(fn):
            found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
            message = (f"ppo.reward_functions: {entry!r}: {spec.source} has no function {spec.function!r} "
                       f"(callables there: {', '.join(found) or 'none'})")
            raise ValueError(message)  # noqa: TRY004 - a recipe error: the CLI reports ValueErrors as such
        out.append(RewardFunction(name=name, fn=fn, weight=spec.weight))
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise ValueError(f"ppo.reward_functions: a function is listed twice: {names}")
    return out


def _number(value) -> float:
    """A function's value for one sample: None counts 0; anything else must be a finite number."""
    if value is None:
        return 0.0
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return number


def _sample(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def evaluate(f: RewardFunction, prompts: list[str], responses: list[str], indices: list[int] | None = None
             ) -> tuple[torch.Tensor, list[str]]:
    """``f`` on a batch -> (one value per sample, warnings for the samples that failed and got 0).

    ``indices``: each sample's place in the iteration's batch (the shard's own order if None), for warnings."""
    indices = list(range(len(prompts))) if indices is None else indices
    try:
        values = list(f.fn(list(prompts), list(responses)))
    except Exception:  # noqa: BLE001 - user code: any error means "find the failing samples"
        values = None  # find which samples fail, one call each
    if values is not None and len(values) != len(prompts):
        raise ValueError(f"reward function {f.name}: returned {len(values)} values for {len(prompts)} samples")
    out, errors = [], []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        try:
            out.append(_number(values[i] if values is not None else f.fn([prompt], [response])[0]))
        except Exception as exc:  # noqa: BLE001 - user code: the sample scores 0 and is named
            out.append(0.0)
            errors.append(f"reward function {f.name}: sample {indices[i]} (prompt {_sample(prompt)}, response "
                          f"{_sample(response)}) failed and scores 0: {exc!r}")
    if prompts and len(errors) == len(prompts):
        raise RuntimeError(f"reward function {f.name} failed on all {len(prompts)} samples of a batch; first: "
                           f"{errors[0]}")
    return torch.tensor(out, dtype=torch.float32), errors
