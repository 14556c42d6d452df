"""DistilBERT distillation: the triple loss against float64 math, the student's initialisation
from every second teacher layer, and a tiny end-to-end "distil" run."""

from __future__ import annotations

import pytest
import torch

from attnkit.errors import UserError
from attnkit.losses import distillation_loss
from attnkit.models.bert import BertForPreTraining, BertModel, bert_config
from attnkit.recipes.distil import init_student, student_config, student_state


@pytest.fixture(autouse=True)
def _restore_threads():
    """Recipes run with train.threads=1 here; give the other tests their thread count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_distillation_loss_matches_float64_hand_computation():
    torch.manual_seed(0)
    n, v, m, c, t = 5, 11, 7, 6, 2.0
    zs, zt = torch.randn(n, v), torch.randn(n, v) * 2
    labels = torch.randint(v, (n,))
    hs, ht = torch.randn(m, c), torch.randn(m, c)
    parts = distillation_loss(zs, zt, labels, hs, ht, temperature=t)
    zs64, zt64, hs64, ht64 = zs.double(), zt.double(), hs.double(), ht.double()
    ce = 0.0
    for i in range(n):
        ps = torch.exp(zs64[i] / t) / torch.exp(zs64[i] / t).sum()
        pt = torch.exp(zt64[i] / t) / torch.exp(zt64[i] / t).sum()
        ce += float((pt * (pt.log() - ps.log())).sum())  # KL(p_t || p_s)
    ce = ce / n * t * t
    mlm = 0.0
    for i in range(n):
        p = torch.exp(zs64[i]) / torch.exp(zs64[i]).sum()
        mlm -= float(p[labels[i]].log())
    mlm /= n
    cos = float(sum(1 - hs64[j] @ ht64[j] / (hs64[j].norm() * ht64[j].norm())
                    for j in range(m))) / m
    assert abs(float(parts["ce"]) - ce) < 1e-5
    assert abs(float(parts["mlm"]) - mlm) < 1e-5
    assert abs(float(parts["cos"]) - cos) < 1e-6
    assert abs(float(parts["loss"]) - (5.0 * ce + 2.0 * mlm + 1.0 * cos)) < 1e-4
    only_cos = distillation_loss(zs, None, labels, hs, ht, alpha_mlm=0.0)
    assert set(only_cos) == {"cos", "loss"}
    assert abs(float(only_cos["loss"]) - cos) < 1e-6


def _teacher(variant: str = "bert", layers: int = 6, heads: str = "mlm") -> torch.nn.Module:
    torch.manual_seed(0)
    preset = "roberta-tiny" if variant == "roberta" else "bert-tiny"
    cfg = bert_config(preset, vocab_size=50, d_model=16, n_heads=2, d_ff=24, n_layers=layers,
                      max_len=40, heads=heads)
    model = BertForPreTraining(cfg) if heads != "none" else BertModel(cfg)
    with torch.no_grad():  # make biases and norms distinct so that a wrong copy shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_student_copies_layers_0_2_4_and_the_embeddings():
    teacher = _teacher(layers=6)
    student = init_student(teacher).eval()
    assert student.cfg.n_layers == 3 and student.bert.token_types is None
    for i, j in enumerate((0, 2, 4)):
        ours, theirs = student.bert.layers[i].state_dict(), teacher.bert.layers[j].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    for i in (1, 2):  # not the teacher's layers 1 and 2 at student positions 1 and 2
        assert not torch.equal(student.bert.layers[i].self_attn.qkv_proj.weight,
                               teacher.bert.layers[i].self_attn.qkv_proj.weight)
    assert torch.equal(student.bert.tokens.weight, teacher.bert.tokens.weight)
    mlm_s, mlm_t = student.mlm.state_dict(), teacher.mlm.state_dict()
    assert all(torch.equal(mlm_s[k], mlm_t[k]) for k in mlm_t)
    # token type 0 folded into the positions: the first embeddings are the teacher's
    ids = torch.randint(5, 50, (2, 9))
    assert torch.allclose(student.bert.embed(ids), teacher.bert.embed(ids), atol=1e-6)
    # the student's weights are copies, not views of the teacher's
    with torch.no_grad():
        student.bert.layers[0].self_attn.qkv_proj.weight.add_(1.0)
    assert not torch.equal(student.bert.layers[0].self_attn.qkv_proj.weight,
                           teacher.bert.layers[0].self_attn.qkv_proj.weight)


def test_student_of_a_headless_roberta_teacher():
    teacher = _teacher("roberta", layers=4, heads="none")
    cfg = student_config(teacher.arch)
    state = student_state(teacher, cfg)
    assert not any(k.startswith("mlm.") for k in state) and cfg.n_layers == 2
    student = init_student(teacher).eval()
    for i, j in enumerate((0, 2)):
        assert torch.equal(student.bert.layers[i].self_attn.qkv_proj.weight,
                           teacher.layers[j].self_attn.qkv_proj.weight)
    ids = torch.randint(5, 50, (2, 9))  # no padding: RoBERTa positions 2.. -> 0..
    # equal up to the LayerNorm epsilon (RoBERTa 1e-5, DistilBERT 1e-12)
    assert torch.allclose(student.bert.embed(ids), teacher.embed(ids), atol=2e-3)
    wrong = teacher.positions.embedding.weight[:9]  # unshifted positions would be far off
    assert not torch.allclose(student.bert.positions.embedding.weight[:9], wrong, atol=1e-2)
    with pytest.raises(UserError, match="exceeds"):
        student_config(teacher.arch, 5)


def test_distil_recipe_end_to_end(tmp_path):
    from attnkit.convert.hf import save_pretrained
    from attnkit.recipes import get_recipe, resolve_config
    from attnkit.tokenizers import Tokenizer

    torch.manual_seed(0)
    lines = [f"the {w} saw a {v} hill ." for w in ("cat", "dog", "owl", "fox")
             for v in ("red", "tall", "green")]
    text = "\n\n".join("\n".join(lines[i: i + 3]) for i in range(0, len(lines), 2)) * 4
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    tok = Tokenizer.train("wordpiece", [text], vocab_size=60)
    cfg = bert_config("bert-tiny", vocab_size=tok.vocab_size, d_model=32, n_heads=2, d_ff=64,
                      n_layers=4, max_len=64, heads="mlm", pooler=False)
    save_pretrained(BertForPreTraining(cfg), tmp_path / "teacher", tok)
    recipe = get_recipe("distil")
    sets = [f"teacher={tmp_path / 'teacher'}", f"data.train={tmp_path / 'text.txt'}",
            f"run_dir={tmp_path / 'run'}", "train.steps=3", "train.eval_every=3",
            "train.save_every=3", "train.log_every=1", "batch_size=4", "max_len=32",
            "speed_repeats=1", "train.threads=1"]
    res = recipe.main(resolve_config(recipe, None, sets), recipe=recipe.name)
    assert res["params"]["student"] < res["params"]["teacher"]
    assert set(res["seconds"]) == {"teacher", "student"}
    assert 0.0 <= res["student_mlm"]["val_mlm_acc"] <= 1.0 and "mlm_acc_retained" in res
    assert -1.0 <= res["val_cos"] <= 1.0
    missing = resolve_config(recipe, None, [f"teacher={tmp_path / 'nothing'}",
                                            f"data.train={tmp_path / 'text.txt'}",
                                            f"run_dir={tmp_path / 'bad'}"])
    with pytest.raises(UserError, match="no such directory"):
        recipe.main(missing, recipe=recipe.name)
