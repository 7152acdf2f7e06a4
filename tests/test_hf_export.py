import json
import pickle
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.schemas.model import ModelConfig
from pipelines.hf_export import (
    HFExporter,
    export_hf,
    from_hf_state_dict,
    hf_config,
    load_hf_model,
    model_config_from_hf,
    to_hf_state_dict,
)
from pipelines.model import build_model
from pipelines.tokenizer import train_tokenizer

# GQA: 4 query heads share 2 key/value heads.
BASE = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 160, "max_seq_len": 64, "rope_theta": 5000.0}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    rng = random.Random(0)
    words = ["ray", "train", "serve", "model", "token", "data", "the", "a", "of", "is"]
    texts = (" ".join(rng.choice(words) for _ in range(40)) for _ in range(500))
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(texts, out, vocab_size=300)
    return out


# Every model option that exports: (options, the transformers class it must load as).
VARIANTS = {
    "tied": ({"tie_embeddings": True}, "LlamaForCausalLM"),
    "untied": ({"tie_embeddings": False}, "LlamaForCausalLM"),
    "qk_norm": ({"qk_norm": True}, "Qwen3ForCausalLM"),
    "relu2": ({"mlp_act": "relu2"}, "LlamaForCausalLM"),
    "qk_norm-relu2-untied": ({"qk_norm": True, "mlp_act": "relu2", "tie_embeddings": False}, "Qwen3ForCausalLM"),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tokenizer_dir, tmp_path_factory):
    options = VARIANTS[request.param][0]
    cfg = ModelConfig(**BASE, **options)
    vocab = 320  # padded past the tokenizer's size, as a training run may do
    model = build_model(cfg, vocab, seed=3).eval()
    with torch.no_grad():  # norms start at ones: random ones make a swapped or dropped norm weight show
        gen = torch.Generator().manual_seed(4)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
    out = tmp_path_factory.mktemp("export") / "hf"
    export_hf(model.state_dict(), cfg, vocab, tokenizer_dir, out)
    return model, cfg, vocab, out


def test_each_option_loads_as_its_transformers_class(exported, request):
    _, _, _, out = exported
    expected = VARIANTS[request.node.callspec.params["exported"]][1]
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == expected


def test_logit_softcap_refuses_to_export(tokenizer_dir, tmp_path):
    # No Llama/Qwen3 class soft-caps logits: exporting would write a model that computes something else.
    cfg = ModelConfig(**BASE, logit_softcap=30.0)
    model = build_model(cfg, 320, seed=0)
    with pytest.raises(ValueError, match="model.logit_softcap"):
        export_hf(model.state_dict(), cfg, 320, tokenizer_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    logits = model(torch.randint(0, 320, (1, 8)))
    assert logits.abs().max() <= 30.0  # the option itself works in training


def test_export_writes_an_hf_directory(exported):
    _, cfg, vocab, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["vocab_size"] == vocab
    assert config["tie_word_embeddings"] is cfg.tie_embeddings
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is (not cfg.tie_embeddings)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_hf_logits_equal_ours(exported):
    model, _, vocab, out = exported
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_hf_generate_matches_our_greedy_decoding(exported):
    model, _, _, out = exported
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok("ray train", return_tensors="pt").input_ids
    generated = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    assert generated.shape[1] > prompt.shape[1]  # HF may stop early at EOS: compare what it produced
    assert torch.equal(generated, ids[:, :generated.shape[1]])


def test_round_trip_hf_ours_hf_is_exact(exported):
    _, cfg, _, out = exported
    hf_sd = load_file(out / "model.safetensors")
    back = to_hf_state_dict(from_hf_state_dict(hf_sd), tie_embeddings=cfg.tie_embeddings)
    assert back.keys() == hf_sd.keys()
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)


def test_load_hf_model_gives_back_the_same_model(exported):
    model, cfg, vocab, out = exported
    loaded, loaded_cfg, loaded_vocab = load_hf_model(out)
    assert (loaded_cfg, loaded_vocab) == (cfg, vocab)
    x = torch.randint(0, vocab, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_tied_weights_are_detected_from_shared_storage():
    model = build_model(ModelConfig(**BASE, tie_embeddings=True), 50, seed=0)
    assert "lm_head.weight" not in to_hf_state_dict(model.state_dict())
    untied = build_model(ModelConfig(**BASE, tie_embeddings=False), 50, seed=0)
    assert "lm_head.weight" in to_hf_state_dict(untied.state_dict())


def test_re_export_replaces_atomically_and_failure_keeps_the_old_export(tokenizer_dir, tmp_path):
    cfg = ModelConfig(**BASE)
    out = tmp_path / "hf"
    export_hf(build_model(cfg, 300, seed=0).state_dict(), cfg, 300, tokenizer_dir, out)
    exporter = pickle.loads(pickle.dumps(HFExporter(cfg, 300, tokenizer_dir)))  # as a Ray Train task ships it
    exporter(build_model(cfg, 300, seed=1).state_dict(), out)
    second = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(second, build_model(cfg, 300, seed=1).embed.weight)
    bad = dict(build_model(cfg, 300, seed=2).state_dict(), **{"layers.0.attn.bogus": torch.zeros(1)})
    with pytest.raises(KeyError, match="bogus"):
        export_hf(bad, cfg, 300, tokenizer_dir, out)
    assert torch.equal(load_file(out / "model.safetensors")["model.embed_tokens.weight"], second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_errors_name_the_problem(tokenizer_dir, tmp_path):
    cfg = ModelConfig(**BASE)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        export_hf(build_model(cfg, 300, seed=0).state_dict(), cfg, 300, tmp_path, tmp_path / "hf")
    with pytest.raises(ValueError, match="vocab_size"):
        export_hf(build_model(cfg, 100, seed=0).state_dict(), cfg, 100, tokenizer_dir, tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_model(tmp_path)
    variant = hf_config(cfg, 300, 1, 2, 0)
    variant.attention_bias = True
    with pytest.raises(ValueError, match="attention_bias"):
        model_config_from_hf(variant)


def test_a_qk_norm_export_starts_a_reward_model_of_its_own_family(tokenizer_dir, tmp_path):
    # The reward stage starts from the pretrained LM: a Qwen3 export must keep its q/k norms there.
    from pipelines.hf_models import init_reward_model

    cfg = ModelConfig(**BASE, qk_norm=True)
    model = build_model(cfg, 320, seed=0)
    export_hf(model.state_dict(), cfg, 320, tokenizer_dir, tmp_path / "hf")
    reward = init_reward_model(tmp_path / "hf")
    assert type(reward).__name__ == "Qwen3ForSequenceClassification"
    assert torch.equal(reward.model.layers[0].self_attn.q_norm.weight, model.layers[0].attn.q_norm.weight)
