"""Export our ``Transformer`` as a Hugging Face Llama (or Qwen3) checkpoint directory, and load one back.

The maths of ``pipelines.model`` is HF Llama's (rotate-half RoPE, fp32 RMSNorm, SwiGLU, GQA), so conversion is
a pure renaming of tensors: no permutation of q/k (that is only needed for Meta's interleaved-RoPE checkpoints).
With ``model.qk_norm`` it is HF Qwen3's (Llama plus a per-head RMSNorm of q and k before RoPE, no sliding
window); ``mlp_act: relu2`` is ``hidden_act="relu2"`` in either. ``logit_softcap`` has no equivalent in these
classes: export refuses it rather than write a model that computes something else.

An export directory holds ``config.json`` (``LlamaConfig``), ``model.safetensors``, ``generation_config.json``, the
tokenizer files and the model card ``README.md`` (pipelines/model_card.py); ``AutoModelForCausalLM`` / ``AutoTokenizer`` (and vLLM) load it as is.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen3Config

from cluster.schemas.model import ModelConfig
from cluster.storage import ObjectPath, local_copy, location, upload_dir
from pipelines.model import Transformer
from pipelines.model_card import CardInfo, write_model_card

# Tokenizer files copied into an export (those present in the tokenizer directory).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# Per-block tensor names: ours -> HF (inside "layers.{i}." / "model.layers.{i}.").
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",  # qk_norm only (Qwen3)
    "attn.k_norm.weight": "self_attn.k_norm.weight",
}
_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "head.norm.weight": "model.norm.weight",
              "head.output.weight": "lm_head.weight"}
_OURS_BLOCK = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def check_exportable(cfg: ModelConfig, key_prefix: str = "model.") -> None:
    """Raise ``ValueError`` naming the option when no transformers class computes what ``cfg`` describes."""
    if cfg.logit_softcap:
        raise ValueError(f"{key_prefix}logit_softcap: {cfg.logit_softcap} has no Hugging Face Llama/Qwen3 "
                         "equivalent (a final-logit soft-cap), so this model cannot be exported; set it to 0")


def hf_config(cfg: ModelConfig, vocab_size: int, bos_id: int | None, eos_id: int | None,
              pad_id: int | None) -> LlamaConfig | Qwen3Config:
    check_exportable(cfg)
    if cfg.qk_norm:
        return Qwen3Config(
            vocab_size=vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.dim // cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std, hidden_act=cfg.mlp_act,
            attention_bias=False, use_sliding_window=False, bos_token_id=bos_id, eos_token_id=eos_id,
            pad_token_id=pad_id)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.dim // cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        hidden_act=cfg.mlp_act,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def model_config_from_hf(config: LlamaConfig | Qwen3Config, source: str = "config.json") -> ModelConfig:
    """The inverse of ``hf_config``; refuses Llama/Qwen3 variants our model does not implement."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if config.model_type not in ("llama", "qwen3"):
        raise ValueError(f"{source}: model_type: {config.model_type!r} is not supported (llama or qwen3)")
    unsupported = {
        "hidden_act": config.hidden_act not in ("silu", "relu2"),
        "use_sliding_window": bool(getattr(config, "use_sliding_window", False)),
        "attention_bias": bool(config.attention_bias),
        "mlp_bias": bool(getattr(config, "mlp_bias", False)),
        "rope_parameters.rope_type": rope.get("rope_type", "default") != "default",
        "head_dim": config.head_dim != config.hidden_size // config.num_attention_heads,
    }
    for key, bad in unsupported.items():
        if bad:
            raise ValueError(f"{source}: {key}: this Llama variant is not supported by pipelines.model")
    return ModelConfig(
        dim=config.hidden_size, n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads, ffn_dim=config.intermediate_size,
        max_seq_len=config.max_position_embeddings, rope_theta=float(rope.get("rope_theta", 10000.0)),
        norm_eps=config.rms_norm_eps, tie_embeddings=bool(config.tie_word_embeddings),
        init_std=config.initializer_range, qk_norm=config.model_type == "qwen3", mlp_act=config.hidden_act)


def _rename(name: str, block_re: re.Pattern, block_prefix: str, block_map: dict, top_map: dict) -> str:
    match = block_re.match(name)
    if match and match.group(2) in block_map:
        return f"{block_prefix}{match.group(1)}.{block_map[match.group(2)]}"
    if name in top_map:
        return top_map[name]
    raise KeyError(f"unexpected tensor name {name!r}")


def _is_tied(sd: dict[str, torch.Tensor], emb: str, head: str) -> bool:
    if head not in sd:
        return True
    a, b = sd[emb], sd[head]
    return a is b or (a.device == b.device and a.data_ptr() == b.data_ptr() and a.shape == b.shape)


def to_hf_state_dict(our_sd: dict[str, torch.Tensor], tie_embeddings: bool | None = None) -> dict:
    """Our names -> HF Llama names. A tied head (``head.output.weight`` missing or sharing the embedding's
    storage, or ``tie_embeddings=True``) is left out: HF re-ties ``lm_head`` from ``tie_word_embeddings``."""
    tied = _is_tied(our_sd, "embed.weight", "head.output.weight") if tie_embeddings is None else tie_embeddings
    top = {k: v for k, v in _TOP_NAMES.items() if not (tied and k == "head.output.weight")}
    return {_rename(k, _OURS_BLOCK, "model.layers.", _BLOCK_NAMES, top): v
            for k, v in our_sd.items() if not (tied and k == "head.output.weight")}


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor]) -> dict:
    """HF Llama names -> ours. Without ``lm_head.weight`` (tied) the head gets the embedding tensor, so the
    result loads strictly into a tied ``Transformer``."""
    block_map = {v: k for k, v in _BLOCK_NAMES.items()}
    top_map = {v: k for k, v in _TOP_NAMES.items()}
    ours = {_rename(k, _HF_BLOCK, "layers.", block_map, top_map): v for k, v in hf_sd.items()
            if not k.endswith("rotary_emb.inv_freq")}  # old HF checkpoints saved this derived buffer
    ours.setdefault("head.output.weight", ours["embed.weight"])
    return ours


@contextlib.contextmanager
def staged_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty temp dir next to ``out_dir``; on success it replaces ``out_dir`` by rename (an older
    ``out_dir`` is removed only after the new one is complete), on failure it is deleted. Readers therefore
    see the old directory, the new one, or none: never a partial one."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
        for path in tmp.iterdir():  # flush file contents before the rename makes them visible
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / "dir")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int,
              tokenizer_dir: str | Path | ObjectPath, out_dir: str | Path | ObjectPath,
              card: CardInfo | None = None) -> Path | ObjectPath:
    """Write an HF Llama/Qwen3 directory (config, safetensors weights, generation config, tokenizer, model card
    when ``card`` says what the model is) atomically; either directory may be on object storage
    (``cluster.storage``)."""
    check_exportable(cfg)
    if not (location(tokenizer_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json (train one with pipelines.tokenizer)")
    out_dir = location(out_dir)
    if isinstance(out_dir, ObjectPath):
        # No directory rename there: the old config.json goes first (the folder reads as "no model"), the new
        # one is uploaded last (it is what readers look for: RunDir.latest_model, from_pretrained).
        with tempfile.TemporaryDirectory(prefix="raylm-export-") as tmp:
            export_hf(state_dict, cfg, vocab_size, tokenizer_dir, Path(tmp) / "model", card)
            (out_dir / "config.json").unlink(missing_ok=True)
            upload_dir(Path(tmp) / "model", out_dir, last=("config.json",))
        return out_dir
    with local_copy(tokenizer_dir) as local_tokenizer:
        _export_local(state_dict, cfg, vocab_size, local_tokenizer, out_dir, card)
    return out_dir


def _export_local(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int, tokenizer_dir: Path,
                  out_dir: Path, card: CardInfo | None) -> None:
    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    if len(tok) > vocab_size:
        raise ValueError(f"vocab_size: {vocab_size} is smaller than the tokenizer in {tokenizer_dir} ({len(tok)})")
    config = hf_config(cfg, vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    # safetensors refuses shared or non-contiguous tensors: give it plain CPU copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone()
               for k, v in to_hf_state_dict(state_dict, cfg.tie_embeddings).items()}
    with staged_directory(out_dir) as tmp:
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id).save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / name)
        write_model_card(tmp, card)


@dataclasses.dataclass(frozen=True)
class HFExporter:
    """``export_hf`` with the model description bound: ``HFExporter(cfg, vocab, tok_dir)(state_dict, out_dir)``.
    Picklable (a module-level class), so it can ride in a Ray Train loop config as a training task's export."""

    cfg: ModelConfig
    vocab_size: int
    tokenizer_dir: str | Path | ObjectPath
    card: CardInfo | None = None

    def __call__(self, state_dict: dict[str, torch.Tensor], out_dir) -> Path | ObjectPath:
        return export_hf(state_dict, self.cfg, self.vocab_size, self.tokenizer_dir, out_dir, self.card)


def load_hf_model(model_dir: str | Path) -> tuple[Transformer, ModelConfig, int]:
    """Our ``Transformer`` (fp32, eval mode) from an HF Llama/Qwen3 directory written by ``export_hf`` (or any
    plain Llama checkpoint in one safetensors file)."""
    model_dir = Path(model_dir)
    for name in ("config.json", "model.safetensors"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name}: missing (not an HF model directory)")
    config = AutoConfig.from_pretrained(str(model_dir))
    cfg = model_config_from_hf(config, str(model_dir / "config.json"))
    model = Transformer(cfg, config.vocab_size)
    state = from_hf_state_dict(load_file(str(model_dir / "model.safetensors")))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval(), cfg, config.vocab_size
