"""Model cards: every export writes README.md whose YAML front-matter huggingface_hub's ModelCard.load reads back
with the right base model, datasets, training stages, license, library and (when the run measured these very
weights) eval results in the model-index format."""
from __future__ import annotations

import json
import pickle

from alignment_fixtures import build_causal_lm
from huggingface_hub import ModelCard
from test_hf_export import BASE, tokenizer_dir  # noqa: F401 - fixture
from transformers import AutoModelForCausalLM

from cluster.recipe import load_recipe
from cluster.schemas.model import ModelConfig
from pipelines.eval.model_eval import weights_sha256
from pipelines.hf_export import HFExporter, export_hf
from pipelines.hf_models import export_hf_model
from pipelines.model import build_model
from pipelines.model_card import BUILTIN_DATA, card_info
from pipelines.pretrain.export import add_known_eval_results

RESULTS = {"heldout": {"source": "data:validation"}, "models": [
    {"name": "pretrain", "weights_sha256": "", "bpb": {"bits_per_byte": 2.36},
     "lm_eval": {"tasks": {"raylm_qa_mc": {"acc": 0.2, "acc_norm": 0.22, "acc_stderr": 0.05}}}},
    {"name": "sft", "weights_sha256": "", "bpb": {"bits_per_byte": 2.78}}]}


def export_pretrained(out, tokenizer_dir, card):  # noqa: F811
    cfg = ModelConfig(**BASE)
    model = build_model(cfg, 320, seed=0)
    exporter = HFExporter(cfg, 320, tokenizer_dir, card)
    exporter = pickle.loads(pickle.dumps(exporter))  # it rides to a Ray Train worker, card included
    exporter(model.state_dict(), out)
    return cfg, model


def test_pretrain_export_card_is_read_by_huggingface_hub(tmp_path, tokenizer_dir):  # noqa: F811
    corpus = tmp_path / "corpus.jsonl"
    recipe = load_recipe(None, [f"data.input=[{corpus}]"])
    out = tmp_path / "run" / "pretrain" / "model"
    export_pretrained(out, tokenizer_dir, card_info(recipe, tmp_path / "run", "pretrain"))
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert "base_model" not in data and data["datasets"] == [str(corpus)]  # from scratch: no base
    assert data["library_name"] == "transformers" and data["license"] == "unknown"
    assert data["pipeline_tag"] == "text-generation" and data["training_stages"] == ["pretrain"]
    assert {"raylm", "llama", "pretrain"} <= set(data["tags"])
    assert card.data.eval_results is None  # not measured yet at export time
    assert "# run-pretrain" in card.text and "raylm lineage" in card.text


def test_later_stages_name_their_base_model_and_data(tmp_path):
    recipe = load_recipe(None, ["sft.data=/data/chats.jsonl"])
    run = tmp_path / "run"
    sft, reward, ppo = (card_info(recipe, run, s) for s in ("sft", "reward", "ppo"))
    assert (sft.base_model, sft.datasets) == (str(run / "pretrain" / "model"), ("/data/chats.jsonl",))
    assert (reward.base_model, reward.datasets) == (str(run / "sft" / "model"), (BUILTIN_DATA["reward"],))
    assert ppo.base_model == str(run / "sft" / "model") and ("algorithm", "ppo") in ppo.extra
    lm = build_causal_lm(tmp_path / "lm")
    out = tmp_path / "sft-export"
    export_hf_model(AutoModelForCausalLM.from_pretrained(lm).state_dict(), out, base_dir=str(lm), card=sft)
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert data["training_stages"] == ["pretrain", "sft"] and data["base_model"] == sft.base_model


def test_eval_results_go_in_as_model_index_only_for_the_weights_measured(tmp_path, tokenizer_dir):  # noqa: F811
    run = tmp_path / "run"
    recipe = load_recipe(None, [])
    out = run / "pretrain" / "model"
    export_pretrained(out, tokenizer_dir, card_info(recipe, run, "pretrain"))
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps(RESULTS))  # other weights: the card keeps no results
    add_known_eval_results(out, recipe, run)
    assert ModelCard.load(out / "README.md").data.eval_results is None
    RESULTS["models"][0]["weights_sha256"] = weights_sha256(out)
    (run / "eval" / "results.json").write_text(json.dumps(RESULTS))
    add_known_eval_results(out, recipe, run)
    card = ModelCard.load(out / "README.md")
    got = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got == {("raylm-heldout", "bits_per_byte"): 2.36, ("raylm_qa_mc", "acc"): 0.2,
                   ("raylm_qa_mc", "acc_norm"): 0.22}
    assert card.data.model_name == "run-pretrain"
    assert "model-index:" in (out / "README.md").read_text()


def test_an_export_without_card_info_writes_none(tmp_path, tokenizer_dir):  # noqa: F811
    cfg = ModelConfig(**BASE)
    export_hf(build_model(cfg, 320, seed=0).state_dict(), cfg, 320, tokenizer_dir, tmp_path / "m")
    assert not (tmp_path / "m" / "README.md").exists()
