"""Hugging Face <-> attnkit mappings for BERT, RoBERTa and DistilBERT (pure dict functions).

The generic loader (:mod:`attnkit.convert.hf`) reads ``config.json`` and the weights, then calls
``config_from_hf`` -> ``build`` -> ``state_from_hf``; ``save_pretrained`` calls
``config_to_hf`` and ``state_to_hf``. Every key is accounted for: a missing, unexpected or
mis-shaped tensor raises :class:`UserError` naming it. HF's separate query/key/value layers
become attnkit's fused ``qkv_proj`` by concatenation along the output dimension (and back).

Checkpoints with an encoder prefix (``bert.``, ``roberta.``, ``distilbert.``) and head-less
ones (MiniLM's plain ``BertModel``) are both read; the HF ``architectures`` entry decides
which heads attnkit builds (``*Model``: none, ``*ForMaskedLM``: MLM, ``BertForPreTraining``:
MLM + NSP).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.errors import ConfigError, UserError
from attnkit.models.bert import BertConfig, build_bert
from attnkit.models.distilbert import DistilBertConfig, build_distilbert

MODEL_TYPES = ("bert", "roberta", "distilbert")

_ACT_FROM_HF = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh"}
_ACT_TO_HF = {"gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_new"}
_PREFIX = {"bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert."}
_CLASS = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert"}
# non-persistent buffers some checkpoints still carry
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


# -- configs ----------------------------------------------------------------------------------
def _heads(hf: dict, family: str) -> str:
    """attnkit heads from the HF ``architectures`` entry (absent = the bare encoder)."""
    arch = (hf.get("architectures") or [f"{_CLASS[family]}Model"])[0]
    name = arch.removeprefix(_CLASS[family])
    heads = {"Model": "none", "ForMaskedLM": "mlm", "ForPreTraining": "mlm_nsp"}.get(name)
    if heads is None or (heads == "mlm_nsp" and family != "bert"):
        raise UserError(f"unsupported {family} architecture '{arch}': attnkit reads "
                        f"{_CLASS[family]}Model and {_CLASS[family]}ForMaskedLM"
                        + (" and BertForPreTraining" if family == "bert" else ""))
    return heads


def _activation(name: object) -> str:
    if name not in _ACT_FROM_HF:
        raise UserError(f"unsupported activation '{name}'; attnkit reads "
                        + ", ".join(sorted(_ACT_FROM_HF)))
    return _ACT_FROM_HF[name]


def _check_unsupported(hf: dict) -> None:
    """Options attnkit's encoders do not implement, named one by one."""
    bad = []
    if hf.get("position_embedding_type", "absolute") != "absolute":
        bad.append(f"position_embedding_type={hf['position_embedding_type']}")
    for key in ("is_decoder", "add_cross_attention", "sinusoidal_pos_embds"):
        if hf.get(key):
            bad.append(f"{key}=true")
    if hf.get("tie_word_embeddings", True) is False or hf.get("tie_weights_", True) is False:
        bad.append("untied output embeddings")
    if bad:
        raise UserError("unsupported Hugging Face options: " + ", ".join(bad))


def config_from_hf(hf: dict) -> BertConfig | DistilBertConfig:
    """attnkit config of a HF ``config.json`` (as a dict) of model_type bert/roberta/distilbert."""
    family = hf.get("model_type")
    if family not in MODEL_TYPES:
        raise UserError(f"model_type '{family}' is not one of {', '.join(MODEL_TYPES)}")
    _check_unsupported(hf)
    heads = _heads(hf, family)
    try:
        if family == "distilbert":
            return DistilBertConfig(
                vocab_size=hf.get("vocab_size", 30522), d_model=hf.get("dim", 768),
                n_heads=hf.get("n_heads", 12), n_layers=hf.get("n_layers", 6),
                d_ff=hf.get("hidden_dim", 3072), max_len=hf.get("max_position_embeddings", 512),
                dropout=hf.get("dropout", 0.1), attention_dropout=hf.get("attention_dropout", 0.1),
                activation=_activation(hf.get("activation", "gelu")),
                pad_id=hf.get("pad_token_id", 0), init_std=hf.get("initializer_range", 0.02),
                heads=heads)
        roberta = family == "roberta"
        return BertConfig(
            vocab_size=hf.get("vocab_size", 50265 if roberta else 30522),
            d_model=hf.get("hidden_size", 768), n_heads=hf.get("num_attention_heads", 12),
            n_layers=hf.get("num_hidden_layers", 12), d_ff=hf.get("intermediate_size", 3072),
            max_len=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            activation=_activation(hf.get("hidden_act", "gelu")),
            eps=hf.get("layer_norm_eps", 1e-12), pad_id=hf.get("pad_token_id", 1 if roberta else 0),
            init_std=hf.get("initializer_range", 0.02), variant=family,
            pooler=heads != "mlm", heads=heads)
    except (ConfigError, TypeError) as err:
        raise UserError(f"invalid {family} config.json: {err}") from None


def _family(cfg: BertConfig | DistilBertConfig) -> str:
    if isinstance(cfg, DistilBertConfig):
        return "distilbert"
    if isinstance(cfg, BertConfig):
        return cfg.variant
    raise UserError(f"not a BERT-family config: {type(cfg).__name__}")


def config_to_hf(cfg: BertConfig | DistilBertConfig) -> dict:
    """A ``config.json`` dict that ``transformers`` loads into the same network."""
    family = _family(cfg)
    suffix = {"none": "Model", "mlm": "ForMaskedLM", "mlm_nsp": "ForPreTraining"}[cfg.heads]
    out = {"model_type": family, "architectures": [_CLASS[family] + suffix],
           "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_len,
           "pad_token_id": cfg.pad_id, "initializer_range": cfg.init_std,
           "tie_word_embeddings": True}
    if family == "distilbert":
        return {**out, "dim": cfg.d_model, "n_heads": cfg.n_heads, "n_layers": cfg.n_layers,
                "hidden_dim": cfg.d_ff, "dropout": cfg.dropout,
                "attention_dropout": cfg.attention_dropout,
                "activation": _ACT_TO_HF[cfg.activation], "sinusoidal_pos_embds": False}
    if cfg.pooler != (cfg.heads != "mlm"):
        raise UserError(f"transformers' {out['architectures'][0]} "
                        + ("has no pooler: set pooler=false" if cfg.heads == "mlm"
                           else "always has a pooler: set pooler=true"))
    if cfg.type_vocab_size == 0:
        raise UserError(f"transformers' {family} needs token types: set type_vocab_size >= 1")
    return {**out, "hidden_size": cfg.d_model, "num_attention_heads": cfg.n_heads,
            "num_hidden_layers": cfg.n_layers, "intermediate_size": cfg.d_ff,
            "type_vocab_size": cfg.type_vocab_size, "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": cfg.attention_dropout,
            "hidden_act": _ACT_TO_HF[cfg.activation], "layer_norm_eps": cfg.eps,
            "position_embedding_type": "absolute"}


def build(cfg: BertConfig | DistilBertConfig) -> nn.Module:
    """The attnkit module a config describes (encoder, or encoder with heads)."""
    return build_distilbert(cfg) if _family(cfg) == "distilbert" else build_bert(cfg)


# -- state dicts ------------------------------------------------------------------------------
Pairs = list[tuple[str, tuple[str, ...]]]  # attnkit key <- HF key(s) (three for fused QKV)


def _both(ours: str, theirs: str) -> Pairs:
    return [(f"{ours}.{p}", (f"{theirs}.{p}",)) for p in ("weight", "bias")]


def _layer_pairs(family: str, i: int) -> Pairs:
    """One encoder layer: attnkit ``layers.i`` <- HF names."""
    ours = f"layers.{i}"
    if family == "distilbert":
        hf = f"transformer.layer.{i}"
        qkv = [f"{hf}.attention.{n}_lin" for n in "qkv"]
        names = [("self_attn.out_proj", "attention.out_lin"), ("attn_res.norm", "sa_layer_norm"),
                 ("ffn.fc1", "ffn.lin1"), ("ffn.fc2", "ffn.lin2"),
                 ("ffn_res.norm", "output_layer_norm")]
    else:
        hf = f"encoder.layer.{i}"
        qkv = [f"{hf}.attention.self.{n}" for n in ("query", "key", "value")]
        names = [("self_attn.out_proj", "attention.output.dense"),
                 ("attn_res.norm", "attention.output.LayerNorm"),
                 ("ffn.fc1", "intermediate.dense"), ("ffn.fc2", "output.dense"),
                 ("ffn_res.norm", "output.LayerNorm")]
    out = [(f"{ours}.self_attn.qkv_proj.{p}", tuple(f"{q}.{p}" for q in qkv))
           for p in ("weight", "bias")]
    for a, b in names:
        out += _both(f"{ours}.{a}", f"{hf}.{b}")
    return out


def _encoder_pairs(family: str, arch: BertConfig) -> Pairs:
    out = [("tokens.weight", ("embeddings.word_embeddings.weight",)),
           ("positions.embedding.weight", ("embeddings.position_embeddings.weight",))]
    if arch.type_vocab_size:
        out.append(("token_types.weight", ("embeddings.token_type_embeddings.weight",)))
    out += _both("embed_norm", "embeddings.LayerNorm")
    for i in range(arch.n_layers):
        out += _layer_pairs(family, i)
    if arch.pooler:
        out += _both("pooler", "pooler.dense")
    return out


# family -> (MLM dense, MLM LayerNorm, MLM bias, tied decoder weight, bias alias)
_HEAD_NAMES = {
    "bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
             "cls.predictions.bias", "cls.predictions.decoder.weight",
             "cls.predictions.decoder.bias"),
    "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias", "lm_head.decoder.weight",
                "lm_head.decoder.bias"),
    "distilbert": ("vocab_transform", "vocab_layer_norm", "vocab_projector.bias",
                   "vocab_projector.weight", None),
}


def _pairs(cfg: BertConfig | DistilBertConfig) -> tuple[str, Pairs]:
    """The family and every (attnkit key, HF keys) pair, prefixes included."""
    family = _family(cfg)
    arch = cfg.bert() if isinstance(cfg, DistilBertConfig) else cfg
    enc = _encoder_pairs(family, arch)
    if cfg.heads == "none":
        return family, enc
    hf_pre = _PREFIX[family]
    out = [("bert." + a, tuple(hf_pre + k for k in b)) for a, b in enc]
    dense, norm, bias = _HEAD_NAMES[family][:3]
    out += _both("mlm.dense", dense) + _both("mlm.norm", norm) + [("mlm.decoder.bias", (bias,))]
    if cfg.heads == "mlm_nsp":
        out += _both("nsp", "cls.seq_relationship")
    return family, out


def _expected_shapes(cfg: BertConfig | DistilBertConfig, keys) -> dict[str, tuple[int, ...]]:
    """Shape of each attnkit key under ``cfg`` (from the sizes; no model is built)."""
    arch = cfg.bert() if isinstance(cfg, DistilBertConfig) else cfg
    c, f, v = arch.d_model, arch.d_ff, arch.vocab_size
    fixed = {"tokens.weight": (v, c), "positions.embedding.weight": (arch.max_len, c),
             "token_types.weight": (arch.type_vocab_size, c), "mlm.decoder.weight": (v, c),
             "mlm.decoder.bias": (v,), "nsp.weight": (2, c), "nsp.bias": (2,)}
    out = {}
    for key in keys:
        name = key.removeprefix("bert.")
        rows = 3 * c if "qkv_proj" in name else f if "fc1" in name else c
        cols = f if "fc2" in name else c
        plain = name.endswith("bias") or "norm" in name
        out[key] = fixed.get(name, (rows,) if plain else (rows, cols))
    return out


def _names(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f" (and {len(keys) - 8} more)" if len(keys) > 8 else "")


def _normalise_hf(sd: dict[str, Tensor], cfg, family: str) -> dict[str, Tensor]:
    """HF keys as :func:`_pairs` names them: buffers dropped, tied/aliased heads resolved."""
    pre = _PREFIX[family]
    if cfg.heads == "none":  # a bare encoder may still carry the family prefix
        sd = {k.removeprefix(pre): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if cfg.heads == "none":
        return sd
    bias, tied, alias = _HEAD_NAMES[family][2:]
    if alias is not None and alias in sd:
        sd.setdefault(bias, sd[alias])
        del sd[alias]
    emb = sd.get(pre + "embeddings.word_embeddings.weight")
    if tied in sd:
        if emb is not None and not torch.equal(sd[tied], emb):
            raise UserError(f"{tied} differs from the word embeddings: untied output "
                            "embeddings are not supported")
        del sd[tied]
    return sd


def state_from_hf(sd: dict[str, Tensor], cfg: BertConfig | DistilBertConfig
                  ) -> dict[str, Tensor]:
    """attnkit state dict of a HF one (key set and shapes checked, names in every error)."""
    family, pairs = _pairs(cfg)
    src = _normalise_hf(sd, cfg, family)
    wanted = {k for _, hf in pairs for k in hf}
    missing, unexpected = wanted - src.keys(), src.keys() - wanted
    if missing:
        raise UserError(f"missing keys in the {family} checkpoint: {_names(missing)}")
    if unexpected:
        raise UserError(f"unexpected keys in the {family} checkpoint: {_names(unexpected)}")
    out = {ours: src[hf[0]] if len(hf) == 1 else torch.cat([src[k] for k in hf], dim=0)
           for ours, hf in pairs}
    if cfg.heads != "none":
        out["mlm.decoder.weight"] = out["bert.tokens.weight"]
    for key, shape in _expected_shapes(cfg, out).items():
        if tuple(out[key].shape) != shape:
            hf = dict(pairs).get(key, (key,))
            raise UserError(f"shape mismatch for {' + '.join(hf)}: checkpoint "
                            f"{tuple(out[key].shape)}, config {shape}")
    return out


def state_to_hf(sd: dict[str, Tensor], cfg: BertConfig | DistilBertConfig
                ) -> dict[str, Tensor]:
    """HF state dict of an attnkit one (or of any subset of its keys).

    Tied output weights are left out (stored once, as ``transformers`` saves them); the fused
    QKV becomes three independent tensors (safetensors refuses views of one storage).
    """
    _, pairs = _pairs(cfg)
    tied = {"mlm.decoder.weight"} if cfg.heads != "none" else set()
    unexpected = sd.keys() - {ours for ours, _ in pairs} - tied
    if unexpected:
        raise UserError(f"keys not in a {type(cfg).__name__} model: {_names(unexpected)}")
    out = {}
    for ours, hf in pairs:
        if ours not in sd:
            continue
        if len(hf) == 1:
            out[hf[0]] = sd[ours]
        else:
            out.update({k: part.clone() for k, part in zip(hf, sd[ours].chunk(3, dim=0),
                                                            strict=True)})
    return out
