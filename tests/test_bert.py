"""BERT, RoBERTa, DistilBERT: exact parity with `transformers`, conversion, presets, errors."""

from __future__ import annotations

import pytest
import torch
import transformers

from attnkit.convert import bert as cb
from attnkit.errors import ConfigError, UserError
from attnkit.models.bert import (
    BertConfig,
    BertForPreTraining,
    BertModel,
    bert_config,
    roberta_position_ids,
)
from attnkit.models.distilbert import DistilBertModel, distilbert_config

TOL = 1e-5
SIZES = dict(vocab_size=99, max_position_embeddings=40, initializer_range=0.2)


def _hf_config(family: str, arch: str, **extra) -> transformers.PretrainedConfig:
    """A random tiny config (odd sizes on purpose: 4 heads of 8, d_ff 37)."""
    if family == "distilbert":
        return transformers.DistilBertConfig(dim=32, n_heads=4, n_layers=3, hidden_dim=37,
                                             architectures=[arch], **SIZES, **extra)
    cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
    return cls(hidden_size=32, num_attention_heads=4, num_hidden_layers=3, intermediate_size=37,
               type_vocab_size=2, layer_norm_eps=1e-12 if family == "bert" else 1e-5,
               architectures=[arch], **SIZES, **extra)


def _pair(family: str, arch: str, attn: str = "eager"):
    """A random HF model and the attnkit model converted from its config and state dict."""
    torch.manual_seed(0)
    hf_cfg = _hf_config(family, arch, attn_implementation=attn)
    hf = getattr(transformers, arch)(hf_cfg).eval()
    with torch.no_grad():  # heads' biases start at zero in HF: make them count
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    cfg = cb.config_from_hf(hf_cfg.to_dict())
    ours = cb.build(cfg).eval()
    ours.load_state_dict(cb.state_from_hf(hf.state_dict(), cfg))
    return hf, ours, cfg


def _batch(family: str, pad_id: int):
    """Ids (3, 13) with two padded rows, the (B, S) mask and segment ids A A .. B B."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    types = (torch.arange(13) >= 6).long().expand(3, -1).clone() * mask
    return ids, mask, (None if family == "distilbert" else types)


ARCHS = [("bert", "BertModel"), ("bert", "BertForPreTraining"), ("bert", "BertForMaskedLM"),
         ("roberta", "RobertaModel"), ("roberta", "RobertaForMaskedLM"),
         ("distilbert", "DistilBertModel"), ("distilbert", "DistilBertForMaskedLM")]


@pytest.mark.parametrize("family,arch", ARCHS)
def test_every_layer_matches_transformers(family, arch):
    """The same transformers-style keyword call on both models: every output name equal."""
    hf, ours, cfg = _pair(family, arch)
    ids, mask, types = _batch(family, hf.config.pad_token_id)
    kw = {} if types is None else {"token_type_ids": types}
    if not arch.endswith("Model"):  # MLM labels: every third real token, -100 elsewhere
        kw["labels"] = ids.masked_fill((mask == 0) | (torch.arange(13) % 3 != 0), -100)
    if arch == "BertForPreTraining":
        kw["next_sentence_label"] = torch.tensor([0, 1, 1])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                 output_attentions=True, **kw)
        out = ours(input_ids=ids, attention_mask=mask, output_attentions=True,
                   output_hidden_states=True, **kw)
    assert len(out.hidden_states) == cfg.n_layers + 1 == len(ref.hidden_states)
    assert len(out.attentions) == cfg.n_layers == len(ref.attentions)
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    for a, b in zip(out.attentions, ref.attentions, strict=True):
        assert a.shape == (3, 4, 13, 13)
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    assert out.attentions[-1][2, :, :, 4:].abs().max() == 0  # padded keys get no weight
    if arch.endswith("Model"):
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=TOL,
                                   rtol=0)
        if family != "distilbert":
            torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=TOL, rtol=0)
        return
    assert ref.loss > 1.0
    torch.testing.assert_close(out.loss, ref.loss, atol=TOL, rtol=0)
    if arch == "BertForPreTraining":
        torch.testing.assert_close(out.logits, ref.prediction_logits, atol=TOL, rtol=0)
        torch.testing.assert_close(out.seq_relationship_logits, ref.seq_relationship_logits,
                                   atol=TOL, rtol=0)
    else:
        torch.testing.assert_close(out.logits, ref.logits, atol=TOL, rtol=0)
        assert out.seq_relationship_logits is None


@pytest.mark.parametrize("family,arch", [("bert", "BertModel"), ("roberta", "RobertaModel"),
                                         ("distilbert", "DistilBertModel")])
def test_fused_path_matches_transformers_sdpa(family, arch):
    hf, ours, _ = _pair(family, arch, attn="sdpa")
    ids, mask, types = _batch(family, hf.config.pad_token_id)
    kw = {} if types is None else {"token_type_ids": types}
    with torch.no_grad():
        for m in (mask, None):  # padded (packed path) and full (unmasked kernel)
            ref = hf(ids, attention_mask=m, **kw)
            out = ours(ids, attention_mask=m, **kw)
            real = torch.ones_like(ids, dtype=torch.bool) if m is None else m.bool()
            torch.testing.assert_close(out.last_hidden_state[real], ref.last_hidden_state[real],
                                       atol=TOL, rtol=0)
            assert not out.last_hidden_state[~real].any()  # packed path: padding is zero
            if family != "distilbert":
                torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=TOL,
                                           rtol=0)


def test_gradients_match_transformers():
    hf, ours, _ = _pair("bert", "BertForPreTraining")
    ids, mask, types = _batch("bert", 0)
    hf.train()
    ours.train()
    for mod in [*hf.modules(), *ours.modules()]:  # dropout off, everything else as in training
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    for layer in ours.bert.layers:
        layer.self_attn.dropout = 0.0  # the attention core's dropout probability
    ref = hf(ids, attention_mask=mask, token_type_ids=types)
    out = ours(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()  # padding positions: garbage in HF, zeros in attnkit's packed path
    (ref.prediction_logits[real].square().mean() + ref.seq_relationship_logits.sum()).backward()
    (out.logits[real].square().mean() + out.seq_relationship_logits.sum()).backward()
    grads = {k: p.grad for k, p in hf.named_parameters()}
    ours_grads = cb.state_to_hf({k: p.grad for k, p in ours.state_dict(keep_vars=True).items()},
                                ours.cfg)
    for key, g in ours_grads.items():
        torch.testing.assert_close(g, grads[key], atol=1e-6, rtol=1e-4, msg=key)


@pytest.mark.parametrize("family,arch", ARCHS)
def test_round_trip_attnkit_hf_attnkit_is_exact(family, arch):
    hf_cfg = cb.config_to_hf(cb.config_from_hf(_hf_config(family, arch).to_dict()))
    cfg = cb.config_from_hf(hf_cfg)
    torch.manual_seed(2)
    ours = cb.build(cfg)
    hf = getattr(transformers, arch)(getattr(transformers, type(_hf_config(family, arch)).__name__)
                                     (**hf_cfg))
    result = hf.load_state_dict(cb.state_to_hf(ours.state_dict(), cfg), strict=False)
    assert not result.unexpected_keys
    assert all("decoder" in k or "vocab_projector" in k for k in result.missing_keys)  # tied
    again = cb.state_from_hf(hf.state_dict(), cb.config_from_hf(hf.config.to_dict()))
    assert again.keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(again[key], value), key
    assert cb.config_from_hf(hf.config.to_dict()) == cfg


def test_preset_parameter_counts():
    def count(model):
        return sum(p.numel() for p in model.parameters())

    with torch.device("meta"):
        assert count(BertModel(bert_config("bert-base"))) == 109_482_240  # the figure
        assert count(DistilBertModel(distilbert_config("distilbert-base"))) == 66_362_880
        for preset, hf_cfg in [
                ("bert-large", transformers.BertConfig(hidden_size=1024, num_hidden_layers=24,
                                                       num_attention_heads=16,
                                                       intermediate_size=4096)),
                ("roberta-base", transformers.RobertaConfig(max_position_embeddings=514,
                                                            type_vocab_size=1))]:
            assert count(BertModel(bert_config(preset))) == count(
                transformers.AutoModel.from_config(hf_cfg))
        pre = BertForPreTraining(bert_config("bert-base", heads="mlm_nsp"))
        assert count(pre) == 109_482_240 + 768 * 768 + 3 * 768 + 30522 + 768 * 2 + 2


def test_roberta_positions_follow_fairseq():
    ids = torch.tensor([[0, 5, 6, 2, 1, 1], [0, 7, 1, 8, 2, 1]])  # pad = 1
    assert roberta_position_ids(ids, 1).tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 1, 4, 5, 1]]


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(3)
    model = BertModel(bert_config("bert-tiny", vocab_size=50)).eval()
    ids = torch.randint(1, 50, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = (padded != 0).long()
    with torch.no_grad():
        alone = model(ids).last_hidden_state
        batch = model(padded.expand(2, -1),
                      attention_mask=mask.expand(2, -1)).last_hidden_state
    torch.testing.assert_close(batch[:, :7], alone.expand(2, -1, -1), atol=1e-6, rtol=0)


def test_mlm_mask_scores_only_selected_positions():
    torch.manual_seed(4)
    model = BertForPreTraining(bert_config("bert-tiny", vocab_size=50, heads="mlm_nsp")).eval()
    ids = torch.randint(1, 50, (2, 9))
    sel = torch.zeros(2, 9, dtype=torch.bool)
    sel[0, 3] = sel[1, 1] = sel[1, 8] = True
    with torch.no_grad():
        full, part = model(ids).logits, model(ids, mlm_mask=sel).logits
    assert part.shape == (3, 50)
    torch.testing.assert_close(part, full[sel], atol=1e-6, rtol=0)
    labels = torch.randint(1, 50, (2, 9))  # (B, S) labels go with the mask's (N, V) logits
    with torch.no_grad():
        loss = model(ids, mlm_mask=sel, labels=labels).loss
    ref = torch.nn.functional.cross_entropy(full[sel].double(), labels[sel])
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=0)
    assert model.mlm.decoder.weight is model.bert.tokens.weight  # tied


def test_conversion_errors_name_the_key():
    hf, ours, cfg = _pair("bert", "BertForPreTraining")
    sd = hf.state_dict()
    broken = {k: v for k, v in sd.items() if "layer.1.attention.self.key.bias" not in k}
    with pytest.raises(UserError, match=r"missing .*encoder\.layer\.1\.attention\.self\.key"):
        cb.state_from_hf(broken, cfg)
    with pytest.raises(UserError, match="unexpected .*classifier.weight"):
        cb.state_from_hf({**sd, "classifier.weight": torch.zeros(2, 32)}, cfg)
    wide = {**sd, "bert.pooler.dense.bias": torch.zeros(33)}
    with pytest.raises(UserError, match=r"shape mismatch for bert\.pooler\.dense\.bias"):
        cb.state_from_hf(wide, cfg)
    untied = {**sd, "cls.predictions.decoder.weight": torch.zeros(99, 32)}
    with pytest.raises(UserError, match="untied"):
        cb.state_from_hf(untied, cfg)


@pytest.mark.parametrize("change,message", [
    (dict(position_embedding_type="relative_key"), "position_embedding_type=relative_key"),
    (dict(is_decoder=True), "is_decoder"),
    (dict(hidden_act="swish"), "activation 'swish'"),
    (dict(architectures=["BertForSequenceClassification"]), "BertForSequenceClassification"),
    (dict(model_type="gpt2"), "model_type 'gpt2'"),
    (dict(num_attention_heads=5), "divisible"),
])
def test_unsupported_configs_are_named(change, message):
    hf = {**_hf_config("bert", "BertModel").to_dict(), **change}
    with pytest.raises(UserError, match=message):
        cb.config_from_hf(hf)


def test_config_validation_and_distilbert_rules():
    with pytest.raises(ConfigError, match="NSP"):
        BertConfig(variant="roberta", pad_id=1, heads="mlm_nsp")
    with pytest.raises(ConfigError, match="did you mean"):
        bert_config("bert-bsae")
    model = DistilBertModel(distilbert_config("distilbert-tiny", vocab_size=40))
    with pytest.raises(UserError, match="no token types"):
        model(torch.ones(1, 3, dtype=torch.long), token_type_ids=torch.zeros(1, 3).long())
    with pytest.raises(UserError, match="exceeds"):
        model(torch.ones(1, 513, dtype=torch.long))
    with pytest.raises(UserError, match="has no pooler"):
        cb.config_to_hf(bert_config("bert-tiny", heads="mlm"))


def test_fast_path_equals_the_encoder_blocks():
    torch.manual_seed(5)
    model = BertModel(bert_config("roberta-tiny", vocab_size=60, max_len=40)).eval()
    ids = torch.randint(3, 60, (4, 17))
    mask = torch.ones_like(ids)
    mask[1, 10:] = mask[3, 2:] = 0
    ids = ids.masked_fill(mask == 0, 1)
    real = mask.bool()
    with torch.no_grad():  # no grad: oneDNN GEMMs where available
        ref = model(ids, attention_mask=mask, output_hidden_states=True)  # the blocks' forward
        fast = model(ids, attention_mask=mask)
        full = model(ids)
    torch.testing.assert_close(fast.last_hidden_state[real], ref.last_hidden_state[real],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.last_hidden_state,
                               model(ids, output_hidden_states=True).last_hidden_state,
                               atol=1e-5, rtol=0)


def test_fast_linear_falls_back_under_autograd():
    from attnkit.nn.fast_linear import inference_linear

    torch.manual_seed(6)
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(9, 24, requires_grad=True)
    out = inference_linear(x, lin)
    assert out.grad_fn is not None  # the ordinary, differentiable nn.Linear
    with torch.no_grad():
        want = x.double() @ lin.weight.double().T + lin.bias.double()
        torch.testing.assert_close(inference_linear(x, lin).double(), want, atol=1e-5, rtol=0)
