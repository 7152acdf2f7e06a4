"""SFT: record parsing, chat rendering with the assistant-only loss mask, packing, built-in Q/A; one real
end-to-end run of ``raylm sft`` (Ray Train + DeepSpeed, 2 workers) on a tiny model."""
from __future__ import annotations

import gzip
import json

import pytest

from pipelines.chat.builtin_qa import builtin_pairs, first_paragraph, preference_pairs, split_pairs
from pipelines.chat.records import IGNORE, encode_chat, pack, read_chats


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from alignment_fixtures import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_read_chats_accepts_both_shapes_and_gzip(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"prompt": "2+2?", "response": "4"}]
    path = tmp_path / "chats.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")
    chats = read_chats(path)
    assert chats[1] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert chats[0][1]["content"] == "hello"


def test_read_chats_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["x", "y"]}), tmp_path / "c.parquet")
    assert [c[1]["content"] for c in read_chats(tmp_path / "c.parquet")] == ["x", "y"]


@pytest.mark.parametrize("line,match", [
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"bad\.jsonl:2: messages\[0\]"),
    ('{"question": "x"}', r"bad\.jsonl:2: needs a `messages` list"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r"bad\.jsonl:2: messages: no assistant turn"),
    ('{not json', r"bad\.jsonl:2: not valid JSON"),
])
def test_bad_records_name_file_line_and_field(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        read_chats(path)


def test_encode_chat_learns_only_assistant_tokens(tokenizer):
    messages = [{"role": "user", "content": "What does `json.dumps` do?"},
                {"role": "assistant", "content": "Serialize obj to a JSON formatted str."}]
    ids, labels = encode_chat(tokenizer, messages, max_len=256)
    learned = [t for t in labels if t != IGNORE]
    assert tokenizer.decode(learned) == "Serialize obj to a JSON formatted str." + tokenizer.eos_token
    assert learned[-1] == tokenizer.eos_token_id and len(ids) == len(labels)
    assert labels[0] == IGNORE and ids[0] == tokenizer.bos_token_id
    assert encode_chat(tokenizer, messages, max_len=5) is None  # truncation left no assistant token


def test_pack_fills_rows_and_keeps_labels_aligned():
    examples = [([1, 2, 3], [IGNORE, 2, 3]), ([4, 5], [IGNORE, 5]), ([6, 7, 8, 9], [IGNORE, IGNORE, 8, 9])]
    rows = pack(examples, max_len=4)
    assert rows == [([1, 2, 3, 4], [IGNORE, 2, 3, IGNORE]), ([5, 6, 7, 8], [5, IGNORE, IGNORE, 8]), ([9], [9])]


def test_builtin_pairs_are_real_docstrings_and_split_is_stable():
    import json as json_mod

    pairs = builtin_pairs()
    by_name = {p.name: p for p in pairs}
    assert len(pairs) > 200
    assert by_name["json.dumps"].question == "What does `json.dumps` do?"
    assert by_name["json.dumps"].answer == first_paragraph(json_mod.dumps.__doc__, 160)
    train, held = split_pairs(pairs, 0.1)
    assert 0 < len(held) < len(pairs) // 5 and not {p.name for p in train} & {p.name for p in held}
    assert split_pairs(pairs[::2], 0.1)[1] == [p for p in held if p in pairs[::2]]  # per-pair, size-independent
    prefs = preference_pairs(pairs[:40])
    assert all(p["chosen"] != p["rejected"] for p in prefs) and len(prefs) >= 38
    assert prefs == preference_pairs(pairs[:40])


def test_first_paragraph_cuts_at_word_boundary():
    assert first_paragraph("Return the\n   sum.\n\nMore text.", 100) == "Return the sum."
    assert first_paragraph("alpha beta gamma delta", 12) == "alpha beta ..."


@pytest.mark.ray
@pytest.mark.deepspeed
def test_sft_stage_end_to_end(ray_cluster, tmp_path):
    from alignment_fixtures import build_causal_lm

    from cluster.recipe import load_recipe
    from cluster.rundir import RunDir, read_metrics
    from cluster.stage import StageContext
    from pipelines.sft.stage import run

    run_dir = RunDir.create(tmp_path / "run")
    build_causal_lm(run_dir.model_dir("pretrain"))
    recipe = load_recipe(overrides=["sft.num_workers=2", "sft.micro_batch_size=4", "sft.max_steps=4",
                                    "sft.warmup_steps=1", "sft.eval_every=2", "sft.eval_batches=2",
                                    "sft.checkpoint_every=4", "sft.lr=3.0e-3"])
    summary = run(StageContext(recipe=recipe, run_dir=run_dir))
    assert summary["steps"] == 4 and summary["train_examples"] > 200
    metrics = read_metrics(run_dir.stage("sft"))
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert "val_loss" in metrics[-1]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = run_dir.model_dir("sft")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).chat_template
    base = AutoModelForCausalLM.from_pretrained(run_dir.model_dir("pretrain"))
    assert any((a - b).abs().max() > 0 for a, b in zip(model.parameters(), base.parameters()))
    from huggingface_hub import ModelCard  # the export's model card, written on the Ray Train worker

    card = ModelCard.load(model_dir / "README.md").data.to_dict()
    assert card["base_model"] == str(run_dir.model_dir("pretrain")) and card["training_stages"] == ["pretrain", "sft"]
