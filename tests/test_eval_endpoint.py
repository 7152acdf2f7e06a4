"""raylm eval --endpoint against a real raylm Serve endpoint (the tiny chat model inside a run dir with lineage and
eval results): lm-eval through the endpoint gives what lm-eval gives in process, the samples come through chat
completions, bad input fails before any work, and GET /v1/models carries the lineage and the eval summary."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest
from openai_schema import validate
from serve_fixtures import deployed, free_port, tiny_chat_model  # noqa: F401 - fixture

from cluster.cli import main as raylm
from cluster.recipe import load_recipe
from cluster.rundir import RunDir
from cluster.stage import StageContext
from pipelines.eval.stage import evaluate
from pipelines.lineage import record_stage

pytestmark = [pytest.mark.ray, pytest.mark.serve,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # pydantic v1-style fields in Ray Serve

API_KEY = "eval-key-0123456789"
KEY_ENV = "RAYLM_TEST_ENDPOINT_KEY"
DOCS = ["The json module encodes Python objects as JSON text.", "os.path.join joins path parts with a slash."]
TASKS = ["eval.tasks=[raylm_qa_mc,raylm_heldout]", "eval.task_limit=3", "eval.max_new_tokens=4"]


@pytest.fixture(scope="module")
def served_run(ray_cluster, tiny_chat_model, tmp_path_factory):  # noqa: F811
    """A run dir whose sft model is the tiny chat model, with lineage records down to a corpus file and a real
    eval/results.json, served with an API key."""
    tmp = tmp_path_factory.mktemp("eval-endpoint")
    corpus, text = tmp / "corpus.jsonl", tmp / "held.jsonl"
    corpus.write_text(json.dumps({"text": DOCS[0]}) + "\n", encoding="utf-8")
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    run = tmp / "run"
    shutil.copytree(tiny_chat_model, run / "sft" / "model")
    recipe = load_recipe(None, [f"data.input=[{corpus}]", f"eval.text=[{text}]", "eval.max_new_tokens=4",
                                "eval.tasks=[]"])
    for stage in ("data", "pretrain", "sft"):
        (run / stage).mkdir(exist_ok=True)
        record_stage(run, recipe, stage)
    evaluate(StageContext(recipe=recipe, run_dir=RunDir.create(run)), parallel=False)
    key_file = tmp / "api-key"
    key_file.write_text(API_KEY + "\n")
    with deployed(tmp / "serve-run", run / "sft" / "model",
                  [f"serve.api_key_file={key_file}", "serve.demo=false", "serve.max_new_tokens=16"]) as (info, _):
        yield {"info": info, "run": run, "corpus": corpus, "text": text, "tmp": tmp}


def test_models_carry_lineage_and_eval_summary(served_run):
    api, headers = served_run["info"]["api"], {"Authorization": f"Bearer {API_KEY}"}
    card = httpx.get(api + "/models/raylm", headers=headers).json()
    validate(card, "Model")  # the extra fields keep OpenAI's shape
    assert [r["stage"] for r in card["lineage"]] == ["sft", "pretrain", "data"]
    assert all(r["verified"] for r in card["lineage"])
    corpus = served_run["corpus"]
    assert card["lineage"][2]["inputs"][0]["path"] == str(corpus)
    assert len(card["lineage"][2]["inputs"][0]["sha256"]) == 64
    assert card["eval"]["served"] == "sft" and card["eval"]["models"][0]["bits_per_byte"] > 0
    assert card["max_model_len"] == 192  # serve.max_prompt_tokens under the model's 512 positions
    listing = httpx.get(api + "/models", headers=headers).json()
    validate(listing, "ListModelsResponse")
    compact = listing["data"][0]["lineage"]
    assert [(r["stage"], r["inputs"]) for r in compact] == [("sft", 0), ("pretrain", 0), ("data", 1)]


def test_eval_of_the_endpoint_equals_lm_eval_in_process(served_run, monkeypatch, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is a dependency: `make install` adds it")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.eval.lm_tasks import run_tasks, write_local_tasks

    monkeypatch.setenv(KEY_ENV, API_KEY)
    args = ["eval", "--endpoint", served_run["info"]["api"], "--api-key-env", KEY_ENV, "--run-dir",
            str(tmp_path / "run"), "--text", str(served_run["text"]), *TASKS]
    # A subprocess: this session's Ray cluster must not mask a Ray start. An endpoint is evaluated over HTTP only.
    out = subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Ray cluster" not in out.stderr  # neither "starting a local Ray cluster" nor "joining Ray cluster"
    results = json.loads((tmp_path / "run" / "eval" / "endpoint" / "results.json").read_text())
    (model,) = results["models"]
    assert model["name"] == "raylm" and model["endpoint"] == served_run["info"]["api"]
    assert model["served"]["lineage_head"]["stage"] == "sft" and model["bpb"] is None
    assert model["samples"]["format"] == "chat"
    assert [s["prompt"] for s in model["samples"]["items"]] == results["settings"]["prompts"]
    assert all(0 <= s["tokens"] <= 4 for s in model["samples"]["items"])
    assert model["lm_eval"]["n_samples"] == {"raylm_heldout": 2, "raylm_qa_mc": 3}
    assert results["heldout"]["documents"] == 2 and results["reward_model"] is None
    # the same tasks on the same model, in process (hf model type): the same numbers
    path = served_run["run"] / "sft" / "model"
    local = run_tasks(AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path),
                      ["raylm_qa_mc", "raylm_heldout"], write_local_tasks(tmp_path / "tasks", DOCS, 0.1),
                      chat=False, batch_size=4, limit=3)
    theirs, ours = model["lm_eval"]["tasks"], local["tasks"]
    assert theirs["raylm_qa_mc"]["acc"] == ours["raylm_qa_mc"]["acc"]
    assert theirs["raylm_heldout"]["bits_per_byte"] == pytest.approx(ours["raylm_heldout"]["bits_per_byte"],
                                                                      abs=1e-4)


def test_bad_endpoint_input_fails_before_any_work(served_run, monkeypatch, tmp_path, capsys):
    api = served_run["info"]["api"]
    dead = f"http://127.0.0.1:{free_port()}/v1"
    monkeypatch.setenv(KEY_ENV, API_KEY)
    monkeypatch.delenv("RAYLM_TEST_UNSET_KEY", raising=False)
    cases = [([dead], f"eval.endpoint: {dead} unreachable"),
             ([api, "--model", "other"], "does not serve 'other' (it serves: raylm)"),
             ([api, "eval.tasks=[no_such_task]"], "unknown lm-eval task 'no_such_task'"),
             ([api, "--api-key-env", "RAYLM_TEST_UNSET_KEY"], "refused no key ($RAYLM_TEST_UNSET_KEY is unset)")]
    for extra, message in cases:
        base = extra[0]
        args = ["eval", "--run-dir", str(tmp_path / "run"), "--endpoint", base, *extra[1:]]
        if "--api-key-env" not in extra:
            args += ["--api-key-env", KEY_ENV]
        assert raylm(args) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "eval").exists()  # nothing was written
