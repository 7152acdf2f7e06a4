"""Export any pretraining checkpoint to Hugging Face format, offline (no Ray, no DeepSpeed engine):

    python -m pipelines.pretrain.export RUN_DIR                       # the latest checkpoint -> RUN_DIR/pretrain/model
    python -m pipelines.pretrain.export RUN_DIR --checkpoint checkpoint_2026-... --out /tmp/step100

The weights are consolidated from what DeepSpeed wrote: per-layer files for pipeline runs, ZeRO partitions via
DeepSpeed's own ``zero_to_fp32``, the plain module state for ZeRO-0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from cluster.config import atomic_write_text
from cluster.recipe import recipe_from_dict
from cluster.storage import ObjectPath, local_copy, location
from pipelines.hf_export import export_hf
from pipelines.model import build_model
from pipelines.model_card import CARD, card_info, render_card
from pipelines.pretrain.shards import read_manifest
from pipelines.train.checkpoint import DEEPSPEED_TAG, weights_only_loads


def consolidated_state(checkpoint_dir: Path, build) -> dict[str, torch.Tensor]:
    """The full model ``state_dict`` held by a checkpoint; ``build()`` makes an empty model (for layer names)."""
    ds_dir = Path(checkpoint_dir) / DEEPSPEED_TAG
    if not ds_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint_dir}: no {DEEPSPEED_TAG}/ folder (not a raylm checkpoint)")
    layer_files = sorted(ds_dir.glob("layer_*-model_states.pt"))
    if layer_files:  # pipeline parallel: one file per layer of Transformer.as_layers()
        model = build()
        layers = model.as_layers()
        if len(layer_files) != len(layers):
            raise ValueError(f"{ds_dir}: {len(layer_files)} layer files for a model of {len(layers)} layers")
        for path, layer in zip(layer_files, layers):
            layer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.state_dict()
    if list(ds_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads():  # DeepSpeed's consolidation loads with weights_only=False by itself
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=DEEPSPEED_TAG)
        return dict(state)
    with weights_only_loads():
        return torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]


def latest_checkpoint(stage_dir):
    found = sorted(p for p in location(stage_dir).glob("checkpoint_*") if p.is_dir())
    if not found:
        raise FileNotFoundError(f"{stage_dir}: no checkpoint_* folder; run `raylm pretrain` first")
    return found[-1]


def export_checkpoint(run_dir, checkpoint: str | None = None, out_dir=None):
    """Either directory may be an object-store URI (the checkpoint is then copied here first)."""
    run_dir = location(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: missing (the resolved recipe every raylm command writes)")
    recipe = recipe_from_dict(yaml.safe_load(config.read_text()))
    manifest = read_manifest(run_dir / "data" / "shards")
    vocab = int(manifest["vocab_size"])
    stage_dir = run_dir / "pretrain"
    source = stage_dir / checkpoint if checkpoint else latest_checkpoint(stage_dir)
    with local_copy(source) as local:
        state = consolidated_state(local, lambda: build_model(recipe.model, vocab, recipe.seed))
    out = export_hf(state, recipe.model, vocab, manifest["tokenizer_dir"],
                    location(out_dir) if out_dir else stage_dir / "model", card_info(recipe, run_dir, "pretrain"))
    if not isinstance(out, ObjectPath):  # eval results are local-run only (eval refuses object-store run dirs)
        add_known_eval_results(out, recipe, run_dir)
    return out


def add_known_eval_results(model_dir: Path, recipe, run_dir: Path) -> None:
    """The card gets the run's eval results when ``raylm eval`` measured these very weights (same sha256)."""
    from pipelines.eval.model_eval import weights_sha256

    path = run_dir / "eval" / "results.json"
    results = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    evaluated = {m["name"]: m.get("weights_sha256") for m in results.get("models", [])}
    if evaluated.get("pretrain") and evaluated["pretrain"] == weights_sha256(Path(model_dir)):
        atomic_write_text(Path(model_dir) / CARD, render_card(card_info(recipe, run_dir, "pretrain", results)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.pretrain.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run directory (a path or an s3:// / gs:// URI)")
    parser.add_argument("--checkpoint", help="checkpoint folder name under RUN_DIR/pretrain (default: latest)")
    parser.add_argument("--out", help="output folder or URI (default: RUN_DIR/pretrain/model)")
    args = parser.parse_args(argv)
    try:
        print(export_checkpoint(args.run_dir, args.checkpoint, args.out))
    except (FileNotFoundError, ValueError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
