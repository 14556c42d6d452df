"""The encoder-decoder Transformer (Vaswani et al. 2017) against published sizes, hand-counted
parameters, hand-computed embeddings and the invariants of section 3: future target tokens and
source padding do not change logits; cached decoding equals full recomputation."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.errors import ConfigError, UserError
from attnkit.models.transformer import (
    Transformer,
    TransformerConfig,
    count_parameters,
    transformer_config,
)

PAD = 0


def tiny(**overrides) -> TransformerConfig:
    opts = dict(src_vocab_size=23, d_model=16, n_heads=4, n_encoder_layers=2,
                n_decoder_layers=2, d_ff=32, max_len=16, dropout=0.1)
    return TransformerConfig(**{**opts, **overrides})


def model_of(cfg: TransformerConfig, dtype=torch.float32) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg).to(dtype).eval()


def tokens(b, n, vocab=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (b, n), generator=g)


# -- sizes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,paper,exact", [("base", 65e6, 63_082_496),
                                                ("big", 213e6, 214_245_376)])
def test_preset_parameter_counts_match_paper(preset, paper, exact):
    # Vaswani et al. 2017, Table 3: base 65M, big 213M parameters, with a shared source-target
    # BPE vocabulary of about 37000 tokens. With vocab 37000 exactly: base 63,082,496 and
    # big 214,245,376 (built on the meta device: no memory, no init cost).
    with torch.device("meta"):
        model = Transformer(transformer_config(preset, src_vocab_size=37000))
    n = count_parameters(model)
    assert abs(n - paper) / paper < 0.05
    assert n == exact


def formula(cfg: TransformerConfig) -> int:
    """Embeddings + per-layer matrices and biases + LayerNorms, counted from the paper."""
    c, f = cfg.d_model, cfg.d_ff
    tgt_v = cfg.tgt_vocab_size or cfg.src_vocab_size
    emb = cfg.src_vocab_size * c
    emb += 0 if cfg.share_embeddings else tgt_v * c
    emb += 0 if cfg.tie_output else tgt_v * c             # output projection, no bias
    attn = 4 * c * c + 4 * c                              # W^Q, W^K, W^V, W^O and biases
    ffn = 2 * c * f + f + c
    enc = attn + ffn + 2 * 2 * c                          # two LayerNorms (gain, bias)
    dec = 2 * attn + ffn + 3 * 2 * c
    pos = cfg.max_len * c if cfg.positions == "learned" else 0
    final = 2 * 2 * c if cfg.norm_first else 0
    return emb + pos + cfg.n_encoder_layers * enc + cfg.n_decoder_layers * dec + final


def test_tiny_parameter_count_by_hand():
    cfg = TransformerConfig(src_vocab_size=11, d_model=8, n_heads=2, n_encoder_layers=2,
                            n_decoder_layers=1, d_ff=16)
    # 11*8 + 2*(4*64+32 + 2*128+16+8 + 32) + (2*(4*64+32) + 2*128+16+8 + 48) = 88 + 1200 + 904
    assert count_parameters(Transformer(cfg)) == 2192 == formula(cfg)
    cfg = TransformerConfig(src_vocab_size=11, tgt_vocab_size=13, d_model=8, n_heads=2,
                            n_encoder_layers=2, n_decoder_layers=1, d_ff=16, max_len=10,
                            share_embeddings=False, tie_output=False, norm_first=True,
                            positions="learned")
    # + 13*8 target embedding + 13*8 output projection + 10*8 positions + 2 final LayerNorms
    assert count_parameters(Transformer(cfg)) == 2192 + 104 + 104 + 80 + 32 == formula(cfg)


# -- embeddings -------------------------------------------------------------------------------
def paper_pe(n, c):
    return torch.tensor([[math.sin(p / 10000 ** (i / c)) if i % 2 == 0
                          else math.cos(p / 10000 ** ((i - 1) / c)) for i in range(c)]
                         for p in range(n)], dtype=torch.float64)


@pytest.mark.parametrize("scale", [True, False])
def test_embeddings_scaled_by_sqrt_d_model(scale):
    model = model_of(tiny(scale_embeddings=scale), torch.float64)
    seen = {}

    def keep(name):
        def hook(module, args):
            seen[name] = args[0]  # the block's input: embeddings + positions (eval: no dropout)
        return hook

    model.encoder[0].register_forward_pre_hook(keep("enc"))
    model.decoder[0].register_forward_pre_hook(keep("dec"))
    src, tgt = tokens(2, 5), tokens(2, 4, seed=2)
    with torch.no_grad():
        model(src, tgt)
    factor = math.sqrt(16) if scale else 1.0
    w = model.src_embed.weight.detach()
    torch.testing.assert_close(seen["enc"], w[src] * factor + paper_pe(5, 16))
    torch.testing.assert_close(seen["dec"], w[tgt] * factor + paper_pe(4, 16))


def test_init_pad_row_zero_and_unit_scaled_embeddings():
    torch.manual_seed(0)
    model = Transformer(tiny(src_vocab_size=2000, d_model=64))
    w = model.src_embed.weight.detach()
    assert (w[PAD] == 0).all()
    assert (w[1:] * math.sqrt(64)).std().item() == pytest.approx(1.0, rel=0.05)


def test_learned_position_zero_is_not_zeroed():
    # Only token embeddings have a padding row: learned position 0 must not be zeroed.
    torch.manual_seed(0)
    model = Transformer(tiny(positions="learned"))
    assert model.positions.embedding.weight[0].abs().sum().item() > 0


@pytest.mark.parametrize("share,tie", [(True, True), (False, True), (False, False)])
def test_tied_weights(share, tie):
    cfg = tiny(share_embeddings=share, tie_output=tie, tgt_vocab_size=0 if share else 19)
    model = Transformer(cfg)
    assert (model.out_proj.weight is model.tgt_embed.weight) == tie
    assert (model.tgt_embed.weight is model.src_embed.weight) == share
    assert model.out_proj.weight.shape == (cfg.target_vocab, 16)
    assert count_parameters(model) == formula(cfg)


# -- invariants -------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_first", [False, True])
def test_future_target_tokens_do_not_change_earlier_logits(norm_first):
    model = model_of(tiny(norm_first=norm_first), torch.float64)
    src, tgt = tokens(2, 6), tokens(2, 7, seed=2)
    with torch.no_grad():
        logits = model(src, tgt).logits
        for k in (1, 3, 6):
            changed = tgt.clone()
            changed[:, k:] = (changed[:, k:] - 4 + 1) % 19 + 4  # a different real token
            new = model(src, changed).logits
            torch.testing.assert_close(new[:, :k], logits[:, :k], rtol=0, atol=1e-12)
            assert not torch.allclose(new[:, k], logits[:, k])


@pytest.mark.parametrize("norm_first", [False, True])
def test_source_padding_does_not_change_logits(norm_first):
    model = model_of(tiny(norm_first=norm_first))
    src, tgt = tokens(2, 5), tokens(2, 4, seed=2)
    padded = torch.cat([src, torch.full((2, 3), PAD)], dim=1)
    with torch.no_grad():
        a, b = model(src, tgt).logits, model(padded, tgt).logits
        # a short source padded in a batch equals the same source alone
        batch = torch.cat([tokens(1, 8, seed=3), padded[:1]], dim=0)
        alone = model(src[:1], tgt[:1]).logits
        in_batch = model(batch, tgt[[1, 0]]).logits[1:]
        # a real token in place of padding does change the logits (the test can fail)
        other = model(torch.cat([src, torch.full((2, 3), 7)], dim=1), tgt).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    torch.testing.assert_close(in_batch, alone, rtol=0, atol=1e-5)
    assert not torch.allclose(other, a, atol=1e-3)


def test_dropout_active_only_in_training():
    model = model_of(tiny())
    src, tgt = tokens(2, 5), tokens(2, 4, seed=2)
    with torch.no_grad():
        a, b = model(src, tgt).logits, model(src, tgt).logits
        model.train()
        torch.manual_seed(0)
        c = model(src, tgt).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_need_weights_shapes_and_rows():
    model = model_of(tiny(), torch.float64)
    src = tokens(2, 6)
    src[1, 4:] = PAD
    tgt = tokens(2, 5, seed=2)
    with torch.no_grad():
        out = model(src, tgt, output_attentions=True)
        plain = model(src, tgt)
    assert plain.encoder_attentions is None and plain.cross_attentions is None
    torch.testing.assert_close(out.logits, plain.logits)
    assert out.logits.shape == (2, 5, 23)
    for name, n, shape in [("encoder_attentions", 2, (2, 4, 6, 6)),
                           ("decoder_attentions", 2, (2, 4, 5, 5)),
                           ("cross_attentions", 2, (2, 4, 5, 6))]:
        ws = getattr(out, name)
        assert len(ws) == n, name
        for w in ws:
            assert w.shape == shape, name
            torch.testing.assert_close(w.sum(-1), torch.ones(shape[:-1], dtype=torch.float64))
    for w in out.encoder_attentions + out.cross_attentions:
        assert (w[1, :, :, 4:] == 0).all() and (w[0] > 0).all()
    for w in out.decoder_attentions:
        lower = torch.ones(5, 5, dtype=torch.bool).tril()
        assert (w[..., ~lower] == 0).all() and (w[..., lower] > 0).all()


# -- incremental decoding ---------------------------------------------------------------------
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformers_keywords_and_output_names(norm_first):
    """Keywords of transformers' encoder-decoders; every output name checked against an
    independent computation (float64): the loss by F.cross_entropy, the logits from the last
    decoder hidden state through the tied embedding, the masks against their defaults."""
    model = model_of(tiny(norm_first=norm_first), torch.float64)
    src, tgt, labels = tokens(2, 6), tokens(2, 5, seed=2), tokens(2, 5, seed=3)
    src[1, 4:] = PAD
    labels[0, 3:] = -100  # not scored
    with torch.no_grad():
        out = model(input_ids=src, decoder_input_ids=tgt, labels=labels,
                    output_attentions=True, output_hidden_states=True)
        masked = model(input_ids=src, attention_mask=(src != PAD).long(),
                       decoder_input_ids=tgt, decoder_attention_mask=torch.ones_like(tgt))
        positional = model(src, tgt)
    ref = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out.loss, ref, rtol=0, atol=1e-12)
    assert positional.loss is None and positional.decoder_hidden_states is None
    for other in (masked, positional):
        torch.testing.assert_close(other.logits, out.logits, rtol=0, atol=1e-12)
    assert len(out.encoder_hidden_states) == len(out.decoder_hidden_states) == 3
    torch.testing.assert_close(out.encoder_last_hidden_state, out.encoder_hidden_states[-1])
    proj = out.decoder_hidden_states[-1] @ model.tgt_embed.weight.T  # (B, T, V), tied output
    torch.testing.assert_close(out.logits, proj, rtol=0, atol=1e-12)
    assert [len(out.encoder_attentions), len(out.decoder_attentions),
            len(out.cross_attentions)] == [2, 2, 2]
    assert (out.cross_attentions[-1][1, :, :, 4:] == 0).all()  # padded source keys


@pytest.mark.parametrize("norm_first,positions", [(False, "sinusoidal"), (True, "learned")])
@pytest.mark.parametrize("chunks", [[1] * 7, [3, 1, 2, 1], [7]])
def test_incremental_steps_equal_forward(norm_first, positions, chunks):
    model = model_of(tiny(norm_first=norm_first, positions=positions))
    src = tokens(3, 6)
    src[1, 3:] = PAD
    tgt = tokens(3, 7, seed=2)
    with torch.no_grad():
        full = model(src, tgt).logits  # (B, T, V)
        state = model.start(src, max_len=7)
        pos = 0
        for n in chunks:
            last, state = model.step(state, tgt[:, pos:pos + n])
            pos += n
            assert state.position == pos
            torch.testing.assert_close(last, full[:, pos - 1], rtol=0, atol=1e-5)


def test_decode_state_reorder_keeps_rows():
    model = model_of(tiny())
    src = tokens(3, 6)
    src[2, 2:] = PAD
    tgt = tokens(3, 5, seed=2)
    index = torch.tensor([2, 0, 2, 1])
    with torch.no_grad():
        state = model.start(src, max_len=5)
        model.step(state, tgt[:, :2])
        state = model.reorder(state, index)
        rest = tokens(4, 3, seed=4)          # each surviving row continues differently
        model.step(state, rest[:, :1])
        last, state = model.step(state, rest[:, 1:])
        prefix = torch.cat([tgt[index, :2], rest], dim=1)
        full = model(src[index], prefix).logits
    assert state.memory_mask.shape == (4, 1, 1, 6)
    torch.testing.assert_close(last, full[:, -1], rtol=0, atol=1e-5)


def test_too_long_sequences_raise_user_error():
    model = model_of(tiny(max_len=8))
    with torch.no_grad():
        with pytest.raises(UserError):
            model(tokens(1, 9), tokens(1, 3))
        with pytest.raises(UserError):
            model(tokens(1, 3), tokens(1, 9))
        with pytest.raises(UserError):
            model.start(tokens(1, 3), max_len=9)
        state = model.start(tokens(1, 3), max_len=8)
        model.step(state, tokens(1, 7))
        with pytest.raises(UserError):
            model.step(state, tokens(1, 2))     # position 9 > model max_len 8
        state = model.start(tokens(1, 3), max_len=4)
        model.step(state, tokens(1, 4))
        with pytest.raises((UserError, ValueError)):
            model.step(state, tokens(1, 1))     # beyond the cache allocated by start()


# -- configs ----------------------------------------------------------------------------------
def test_invalid_configs_raise_config_error():
    with pytest.raises(ConfigError, match="divisible"):
        tiny(d_model=18, n_heads=4)
    with pytest.raises(ConfigError, match="relu"):
        tiny(activation="rleu")
    with pytest.raises(ConfigError):
        tiny(share_embeddings=True, tgt_vocab_size=30)
    with pytest.raises(ConfigError):
        tiny(dropout=1.0)
    with pytest.raises(ConfigError):
        tiny(n_decoder_layers=0)
    assert tiny(share_embeddings=True, tgt_vocab_size=23).target_vocab == 23


def test_unknown_preset_suggests_nearest():
    with pytest.raises(ConfigError, match="did you mean 'base'"):
        transformer_config("bsae")
    cfg = transformer_config("big", src_vocab_size=100)
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout) == (1024, 16, 4096, 0.3)
