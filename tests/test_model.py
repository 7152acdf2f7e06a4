import math

import pytest
import torch

from cluster.schemas.model import ModelConfig
from pipelines.model import Block, EmbeddingLayer, HeadLayer, build_model, count_params, flops_per_token

VOCAB = 97
CFG = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=32)


def tokens(batch=2, length=16, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_forward_shape_and_dtype():
    model = build_model(CFG, VOCAB, seed=0)
    logits = model(tokens(3, 11))
    assert logits.shape == (3, 11, VOCAB)
    assert logits.dtype == torch.float32


def test_as_layers_is_a_tensor_chain_equal_to_forward():
    model = build_model(CFG, VOCAB, seed=0).eval()
    layers = model.as_layers()
    assert [type(m) for m in layers] == [EmbeddingLayer] + [Block] * CFG.n_layers + [HeadLayer]
    x = tokens()
    h = x
    for layer in layers:
        h = layer(h)
        assert isinstance(h, torch.Tensor)
    assert torch.equal(h, model(x))


def test_forward_with_labels_returns_the_next_token_loss_and_its_gradients():
    # The loss is computed inside forward so torch.compile fuses it with the head; it must be exactly the
    # cross-entropy of the logits, with the same gradients.
    model = build_model(CFG, VOCAB, seed=0)
    seq = tokens(2, 17, seed=1)
    inputs, labels = seq[:, :-1], seq[:, 1:]
    loss = model(inputs, labels)
    assert loss.shape == () and loss.dtype == torch.float32
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(inputs)
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
    reference.backward()
    assert torch.allclose(loss, reference, rtol=0, atol=1e-6)
    for name, param in model.named_parameters():
        assert torch.allclose(grads[name], param.grad, rtol=1e-5, atol=1e-7), name


def test_blocks_own_rope_tables_outside_the_state_dict():
    model = build_model(CFG, VOCAB, seed=0)
    block = model.layers[0]
    assert block.rope_cos.shape == (CFG.max_seq_len, CFG.dim // CFG.n_heads)
    assert not any("rope" in k for k in model.state_dict())


def test_attention_is_causal():
    model = build_model(CFG, VOCAB, seed=0).eval()
    x = tokens(1, 12)
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_init_is_deterministic_from_the_seed():
    torch.manual_seed(123)  # the global RNG must not matter
    a = build_model(CFG, VOCAB, seed=7).state_dict()
    torch.manual_seed(456)
    b = build_model(CFG, VOCAB, seed=7).state_dict()
    c = build_model(CFG, VOCAB, seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attn.wq.weight"], c["layers.0.attn.wq.weight"])


def test_init_scales_residual_projections():
    cfg = ModelConfig(dim=256, n_layers=8, n_heads=4, n_kv_heads=4, ffn_dim=256, init_std=0.02)
    model = build_model(cfg, VOCAB, seed=0)
    assert model.layers[0].attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    expected = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert model.layers[0].attn.wo.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.layers[0].mlp.w_down.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert torch.equal(model.head.norm.weight, torch.ones(cfg.dim))


def test_tied_head_shares_the_embedding():
    tied = build_model(CFG, VOCAB, seed=0)
    assert tied.head.output.weight is tied.embed.weight
    untied = build_model(ModelConfig(**{**CFG.__dict__, "tie_embeddings": False}), VOCAB, seed=0)
    assert untied.head.output.weight is not untied.embed.weight
    assert count_params(untied) - count_params(tied) == VOCAB * CFG.dim
    assert count_params(tied, non_embedding=True) == count_params(untied, non_embedding=True)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = tokens()
    grads = []
    for ckpt in (False, True):
        model = build_model(CFG, VOCAB, seed=0)
        model.gradient_checkpointing = ckpt
        model(x).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)


def test_too_long_sequence_is_a_clear_error():
    model = build_model(CFG, VOCAB, seed=0)
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(tokens(1, 33))


def test_flops_per_token_counts_every_matmul_weight():
    model = build_model(CFG, VOCAB, seed=0)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    seq = 32
    assert flops_per_token(CFG, VOCAB, seq) == 6 * matmul + 12 * CFG.n_layers * CFG.dim * seq


def test_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
