"""Hugging Face GPT-2 (``GPT2LMHeadModel`` / ``GPT2Model``) <-> :class:`attnkit.models.gpt2.GPT2`.

Hugging Face keeps OpenAI's ``Conv1D`` layers, whose weight is stored (in, out), the transpose of
``nn.Linear``'s (out, in): the four projections of each block (``attn.c_attn``, ``attn.c_proj``,
``mlp.c_fc``, ``mlp.c_proj``) are transposed on the way in and out. Queries, keys and values are
fused in one (C -> 3C) projection on both sides, in the same q | k | v order. Keys may carry the
``transformer.`` prefix (GPT2LMHeadModel) or not (GPT2Model, the original hub checkpoints); the
output projection ``lm_head.weight`` is tied to ``wte.weight`` and then not stored, as
transformers saves it.
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from attnkit.errors import UserError
from attnkit.models.gpt2 import GPT2, GPT2Config

MODEL_TYPES = ("gpt2",)
PREFIX = "transformer."

# top-level Hugging Face name (without the prefix) -> ours
TOP = {"wte.weight": "tok_embed.weight", "wpe.weight": "positions.embedding.weight",
       "ln_f.weight": "final_norm.weight", "ln_f.bias": "final_norm.bias"}
# per block: Hugging Face module -> ours
BLOCK = {"ln_1": "attn_res.norm", "attn.c_attn": "self_attn.qkv_proj",
         "attn.c_proj": "self_attn.out_proj", "ln_2": "ffn_res.norm", "mlp.c_fc": "ffn.fc1",
         "mlp.c_proj": "ffn.fc2"}
CONV1D = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}  # (in, out) weights
# causal-mask buffers older transformers versions saved; we build masks on the fly
IGNORED = re.compile(r"^h\.\d+\.(attn|crossattention)\.(bias|masked_bias)$")
_HF_BLOCK = re.compile(r"^h\.(\d+)\.(.+)\.(weight|bias)$")
_OUR_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")

# Hugging Face activation names -> ours (gelu_new, gelu_fast and gelu_pytorch_tanh are all the
# tanh approximation of GELU; they differ only in rounding)
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
TO_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
# options we do not implement: name -> the only value we accept
UNSUPPORTED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
               "add_cross_attention": False}


def config_from_hf(hf: dict) -> GPT2Config:
    """Our config from a Hugging Face GPT-2 ``config.json`` (UserError on what we lack)."""
    bad = [f"{k}={hf[k]!r}" for k, ok in UNSUPPORTED.items() if k in hf and hf[k] != ok]
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        bad.append(f"activation_function={act!r}")
    if bad:
        raise UserError("unsupported GPT-2 options in config.json: " + ", ".join(bad))
    try:
        return GPT2Config(
            vocab_size=int(hf.get("vocab_size", 50257)),
            n_positions=int(hf.get("n_positions", 1024)), d_model=int(hf.get("n_embd", 768)),
            n_heads=int(hf.get("n_head", 12)), n_layers=int(hf.get("n_layer", 12)),
            d_ff=int(hf.get("n_inner") or 0), dropout=float(hf.get("resid_pdrop", 0.1)),
            attention_dropout=float(hf.get("attn_pdrop", 0.1)), activation=ACTIVATIONS[act],
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            init_std=float(hf.get("initializer_range", 0.02)))
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid GPT-2 config.json: {err}") from None


def config_to_hf(cfg: GPT2Config) -> dict:
    """A ``config.json`` for transformers' GPT2LMHeadModel.

    Special ids: GPT-2's ``<|endoftext|>`` (50256) for its own vocabulary of 50257, otherwise
    attnkit's fixed BOS=1, EOS=2 (save_pretrained replaces them by the tokenizer's when given).
    """
    special = 50256 if cfg.vocab_size == 50257 else None
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_embd": cfg.d_model,
        "n_head": cfg.n_heads, "n_layer": cfg.n_layers,
        "n_inner": cfg.d_ff or None, "activation_function": TO_HF_ACTIVATION[cfg.activation],
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.attention_dropout, "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": special if special is not None else min(1, cfg.vocab_size - 1),
        "eos_token_id": special if special is not None else min(2, cfg.vocab_size - 1),
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False,
    }


def build(cfg: GPT2Config) -> nn.Module:
    return GPT2(cfg)


def _key_from_hf(key: str) -> tuple[str | None, bool]:
    """(our key or None when unknown, whether the tensor is a Conv1D weight to transpose)."""
    if key in TOP:
        return TOP[key], False
    m = _HF_BLOCK.match(key)
    if m and m.group(2) in BLOCK:
        layer, module, kind = m.groups()
        return f"blocks.{layer}.{BLOCK[module]}.{kind}", kind == "weight" and module in CONV1D
    return None, False


def state_from_hf(sd: dict[str, Tensor], cfg: GPT2Config) -> dict[str, Tensor]:
    """Our state dict from a Hugging Face one; unknown keys keep their names (unexpected)."""
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        bare = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if IGNORED.match(bare):
            continue
        if bare == "lm_head.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = t
            continue
        ours, transpose = _key_from_hf(bare)
        if ours is None:
            out[key] = t
        else:
            out[ours] = t.t() if transpose else t  # Conv1D (in, out) -> Linear (out, in)
    if cfg.tie_embeddings and "tok_embed.weight" in out:
        out["lm_head.weight"] = out["tok_embed.weight"]
    return out


def state_to_hf(sd: dict[str, Tensor], cfg: GPT2Config) -> dict[str, Tensor]:
    """The GPT2LMHeadModel state dict of ours (lm_head.weight only when untied)."""
    top = {v: k for k, v in TOP.items()}
    block = {v: k for k, v in BLOCK.items()}
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        if key == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[key] = t
            continue
        if key in top:
            out[PREFIX + top[key]] = t
            continue
        m = _OUR_BLOCK.match(key)
        if not m or m.group(2) not in block:
            raise UserError(f"no Hugging Face GPT-2 name for tensor '{key}'")
        layer, module, kind = m.group(1), block[m.group(2)], m.group(3)
        transpose = kind == "weight" and module in CONV1D
        out[f"{PREFIX}h.{layer}.{module}.{kind}"] = t.t() if transpose else t
    return out
