"""The "distil" recipe: DistilBERT's knowledge distillation (Sanh et al. 2019).

The teacher (an attnkit "bert-pretrain"/"roberta-pretrain" run or a Hugging Face directory) is
frozen in eval mode. The student is a DistilBERT (no token types, no pooler) of half the
teacher's layers, initialised "by taking one layer out of two" (section 3): student layer i =
teacher layer 2i, plus the teacher's token and position embeddings and embedding LayerNorm
(the teacher's token-type-0 vector is folded into the positions, so that the student's first
embeddings equal the teacher's for single-segment input; a RoBERTa teacher's positions are
shifted by its padding offset) and the teacher's MLM head when it has one.

Training data: full sentences packed across documents with dynamic masking, no NSP (section
3). Loss (:func:`attnkit.losses.distillation_loss`, the reference code's defaults):
5.0 * T^2 * KL(p_teacher || p_student at T = 2) + 2.0 * MLM + 1.0 * (1 - cos) of the last
hidden states. A teacher without an MLM head (e.g. all-MiniLM-L6-v2, a bare BertModel) gives
no soft targets: the student then learns from the cosine term and its own MLM loss only (a
fresh MLM head), and quality is compared on hidden-state cosine and the downstream task.

The report puts teacher and student side by side -- parameters, inference time (interleaved,
median), held-out MLM, and optionally a downstream fine-tuning of both (``downstream.*``, the
"finetune" recipe's settings) -- against the paper's 40% smaller, 60% faster, 97% retained.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit import accel
from attnkit.data.mlm import (
    MaskConfig,
    Masker,
    MLMBatch,
    MLMBatches,
    MLMEvalConfig,
    PretrainData,
    held_out,
    make_examples,
)
from attnkit.errors import ConfigError, UserError
from attnkit.evaluation import eval_loop, mlm_scores
from attnkit.loading import load
from attnkit.losses import IGNORE, distillation_loss
from attnkit.models import ENCODERS
from attnkit.models.bert import BertConfig, encoder_of
from attnkit.models.distilbert import DistilBertConfig, build_distilbert
from attnkit.recipes import finetune
from attnkit.recipes.lm import load_corpus, with_data_default
from attnkit.recipes.run import setup_run
from attnkit.rundir import RESULTS, TOKENIZER, write_json_atomic
from attnkit.tokenizers import Tokenizer
from attnkit.train import distributed as dist
from attnkit.train.loop import TrainConfig, fit
from attnkit.train.optim import OptimConfig

PAPER = {"smaller": 0.40, "faster": 0.60, "retained": 0.97}  # Sanh et al. 2019, abstract


@dataclass(frozen=True)
class DistilConfig:
    teacher: str = ""          # an attnkit BERT/RoBERTa run or a Hugging Face directory
    data: PretrainData = field(default_factory=PretrainData)
    student_layers: int = 0    # 0 = half the teacher's (rounded up)
    temperature: float = 2.0
    alpha_ce: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    max_len: int = 128
    batch_size: int = 32
    masking: MaskConfig = field(default_factory=MaskConfig)  # dynamic, as DistilBERT
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: MLMEvalConfig = field(default_factory=MLMEvalConfig)
    speed_repeats: int = 5     # timing rounds (teacher and student interleaved)
    downstream: finetune.FinetuneConfig = field(default_factory=finetune.FinetuneConfig)
    run_dir: str = ""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if min(self.alpha_ce, self.alpha_mlm, self.alpha_cos) < 0:
            raise ConfigError("alpha_ce, alpha_mlm and alpha_cos must be >= 0")
        if self.student_layers < 0 or self.max_len < 4 or self.batch_size < 1:
            raise ConfigError("student_layers >= 0, max_len >= 4 and batch_size >= 1 required")
        if self.speed_repeats < 1:
            raise ConfigError("speed_repeats must be >= 1")


# ---- the student -------------------------------------------------------------------------------
def student_config(arch: BertConfig, n_layers: int = 0) -> DistilBertConfig:
    """A DistilBERT of the teacher's width with ``n_layers`` (0: half the teacher's)."""
    n = n_layers or (arch.n_layers + 1) // 2
    if n > arch.n_layers:
        raise UserError(f"student_layers {n} exceeds the teacher's {arch.n_layers} layers")
    return DistilBertConfig(vocab_size=arch.vocab_size, d_model=arch.d_model,
                            n_heads=arch.n_heads, n_layers=n, d_ff=arch.d_ff,
                            max_len=arch.max_tokens, dropout=arch.dropout,
                            attention_dropout=arch.attention_dropout,
                            activation=arch.activation, pad_id=arch.pad_id,
                            init_std=arch.init_std, heads="mlm")


def student_state(teacher: nn.Module, cfg: DistilBertConfig) -> dict[str, Tensor]:
    """The student's initial state dict from the teacher's (a pure mapping, copies).

    Student layer i <- teacher layer 2i; embeddings and embedding norm copied (token type 0
    folded into the positions; RoBERTa's positions shifted by pad_id + 1); the MLM head
    copied when the teacher has one (``mlm.*`` keys are absent otherwise).
    """
    enc = encoder_of(teacher)
    arch, sd = enc.arch, enc.state_dict()
    if 2 * (cfg.n_layers - 1) >= arch.n_layers:
        raise UserError(f"a {arch.n_layers}-layer teacher has no layer {2 * (cfg.n_layers - 1)} "
                        f"for a {cfg.n_layers}-layer student")
    first = arch.pad_id + 1 if arch.variant == "roberta" else 0
    pos = sd["positions.embedding.weight"][first: first + cfg.max_len]
    if "token_types.weight" in sd:
        pos = pos + sd["token_types.weight"][0]
    out = {"bert.tokens.weight": sd["tokens.weight"], "bert.positions.embedding.weight": pos,
           "bert.embed_norm.weight": sd["embed_norm.weight"],
           "bert.embed_norm.bias": sd["embed_norm.bias"]}
    for i in range(cfg.n_layers):
        prefix = f"layers.{2 * i}."
        out.update({f"bert.layers.{i}.{k[len(prefix):]}": v for k, v in sd.items()
                    if k.startswith(prefix)})
    head = getattr(teacher, "mlm", None)
    if head is not None:
        out.update({f"mlm.{k}": v for k, v in head.state_dict().items()})
    return {k: v.detach().clone() for k, v in out.items()}


def init_student(teacher: nn.Module, n_layers: int = 0) -> nn.Module:
    """A DistilBERT with an MLM head initialised from ``teacher`` (see :func:`student_state`)."""
    cfg = student_config(encoder_of(teacher).arch, n_layers)
    student = build_distilbert(cfg)
    state = student_state(teacher, cfg)
    missing, unexpected = student.load_state_dict(state, strict=False)
    left = [k for k in missing if not k.startswith("mlm.")]
    if left or unexpected:
        raise UserError(f"teacher weights do not fit the student: missing {left[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return student


# ---- loss and evaluation -----------------------------------------------------------------------
def _teacher_outputs(teacher: nn.Module, batch: MLMBatch, selected: Tensor
                     ) -> tuple[Tensor, Tensor | None]:
    """(last hidden (B, S, C), MLM logits at ``selected`` (N, V) or None), no gradients."""
    with torch.no_grad():
        enc = encoder_of(teacher)(batch.ids, attention_mask=batch.attention_mask)
        hidden = enc.last_hidden_state
        head = getattr(teacher, "mlm", None)
        return hidden, None if head is None else head(hidden[selected])


def make_loss(teacher: nn.Module, cfg: DistilConfig):
    """``loss_fn`` for :func:`fit`: the weighted triple loss times the masked-token count."""
    def compute(model: nn.Module, batch: MLMBatch) -> tuple[Tensor, int]:
        selected = batch.labels != IGNORE
        t_hidden, t_logits = _teacher_outputs(teacher, batch, selected)
        out = model(batch.ids, attention_mask=batch.attention_mask, mlm_mask=selected)
        real = batch.attention_mask.bool()
        parts = distillation_loss(out.logits, t_logits, batch.labels[selected],
                                  out.encoder.last_hidden_state[real], t_hidden[real],
                                  temperature=cfg.temperature, alpha_ce=cfg.alpha_ce,
                                  alpha_mlm=cfg.alpha_mlm, alpha_cos=cfg.alpha_cos)
        n = max(1, int(selected.sum()))
        return parts["loss"] * n, n
    return compute


@torch.no_grad()
def hidden_cosine(a: nn.Module, b: nn.Module, batches: list[MLMBatch]) -> float:
    """Mean cosine between two encoders' last hidden states over real tokens."""
    total, n = 0.0, 0
    for batch in eval_loop(batches, next(a.parameters()).device, desc="cosine"):
        ha = encoder_of(a)(batch.ids, attention_mask=batch.attention_mask).last_hidden_state
        hb = encoder_of(b)(batch.ids, attention_mask=batch.attention_mask).last_hidden_state
        real = batch.attention_mask.bool()
        total += float(F.cosine_similarity(ha[real], hb[real], dim=-1).double().sum())
        n += int(real.sum())
    return total / max(1, n)


def make_evaluate(teacher: nn.Module, val: list[MLMBatch]):
    def evaluate(model: nn.Module) -> dict[str, float]:
        model = dist.unwrap(model)
        return {**mlm_scores(model, val), "val_cos": hidden_cosine(model, teacher, val)}
    return evaluate


# ---- comparison --------------------------------------------------------------------------------
@torch.no_grad()
def inference_seconds(models: dict[str, nn.Module], batches: list[MLMBatch], repeats: int
                      ) -> dict[str, float]:
    """Median seconds per pass of each encoder over ``batches``, the models interleaved."""
    times: dict[str, list[float]] = {k: [] for k in models}
    device = next(next(iter(models.values())).parameters()).device
    batches = [batch.to(device) for batch in batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for m in models.values():
        m.eval()
        encoder_of(m)(batches[0].ids, attention_mask=batches[0].attention_mask)  # warm-up
    for _ in range(repeats):
        for name, m in models.items():
            start = time.perf_counter()
            for batch in batches:
                encoder_of(m)(batch.ids, attention_mask=batch.attention_mask)
            sync()  # a GPU runs ahead of the host: time the work, not the launches
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compare(teacher: nn.Module, student: nn.Module, val: list[MLMBatch], repeats: int
            ) -> dict[str, Any]:
    """Side-by-side figures: encoder parameters, inference time, held-out MLM, cosine."""
    t_enc, s_enc = encoder_of(teacher), encoder_of(student)
    speed = inference_seconds({"teacher": teacher, "student": student}, val, repeats)
    out: dict[str, Any] = {
        "params": {"teacher": n_params(t_enc), "student": n_params(s_enc)},
        "seconds": speed, "threads": torch.get_num_threads(),
        "student_mlm": mlm_scores(student, val), "val_cos": hidden_cosine(student, teacher, val)}
    out["smaller"] = 1 - out["params"]["student"] / out["params"]["teacher"]
    out["faster"] = speed["teacher"] / speed["student"] - 1  # the paper's "60% faster"
    if getattr(teacher, "mlm", None) is not None:
        out["teacher_mlm"] = mlm_scores(teacher, val)
        out["mlm_acc_retained"] = (out["student_mlm"]["val_mlm_acc"]
                                   / max(1e-12, out["teacher_mlm"]["val_mlm_acc"]))
    return out


def run_downstream(cfg: DistilConfig, run_dir: Path) -> dict[str, Any]:
    """Fine-tune teacher and student with the same ``cfg.downstream`` settings."""
    scores = {}
    for name, init in (("teacher", cfg.teacher), ("student", str(run_dir))):
        sub = replace(cfg.downstream, init=init, run_dir=str(run_dir / f"downstream-{name}"))
        scores[name] = finetune.train_and_report(sub, recipe="finetune")["valid"]
    key = "accuracy" if "accuracy" in scores["teacher"] else "f1"
    return {**scores, "metric": key,
            "retained": scores["student"][key] / max(1e-12, scores["teacher"][key])}


def print_comparison(res: dict[str, Any]) -> None:
    p, s = res["params"], res["seconds"]
    lines = [f"parameters: teacher {p['teacher']:,}, student {p['student']:,} "
             f"({100 * res['smaller']:.0f}% smaller; paper 40%)",
             f"inference: teacher {s['teacher']:.3f} s, student {s['student']:.3f} s "
             f"({100 * res['faster']:.0f}% faster; paper 60%; {res['threads']} threads)",
             f"hidden-state cosine student/teacher: {res['val_cos']:.4f}"]
    if "teacher_mlm" in res:
        lines.append(f"held-out MLM accuracy: teacher {res['teacher_mlm']['val_mlm_acc']:.4f}, "
                     f"student {res['student_mlm']['val_mlm_acc']:.4f} "
                     f"({100 * res['mlm_acc_retained']:.1f}% retained; paper 97%)")
    if "downstream" in res:
        d, k = res["downstream"], res["downstream"]["metric"]
        lines.append(f"downstream {k}: teacher {d['teacher'][k]:.4f}, student "
                     f"{d['student'][k]:.4f} ({100 * d['retained']:.1f}% retained)")
    print("\n".join(lines))


# ---- the recipe --------------------------------------------------------------------------------
def _data(cfg: DistilConfig, tok: Tokenizer, vocab_size: int
          ) -> tuple[MLMBatches, list[MLMBatch]]:
    """Training stream (packed, dynamically masked) and held-out batches (static masks)."""
    train_texts, val_texts = load_corpus(cfg.data)
    masker = Masker.for_tokenizer(cfg.masking, tok, vocab_size)
    common = dict(max_len=cfg.max_len, nsp=False, doc_lines=cfg.data.doc_lines)
    examples = make_examples(tok, train_texts, seed=cfg.train.seed, **common)
    pad = tok.pad_id if tok.pad_id is not None else 0
    val = held_out(make_examples(tok, val_texts, seed=cfg.train.seed + 1, **common), cfg.eval,
                   masker, pad)
    return MLMBatches(examples, cfg.batch_size, masker, pad, seed=cfg.train.seed), val


def main(cfg: DistilConfig, recipe: str = "distil") -> dict:
    """Distil ``cfg.teacher`` into a half-depth DistilBERT, then compare the two."""
    if not cfg.teacher:
        raise UserError("set teacher=DIR: an attnkit bert-pretrain run or a Hugging Face "
                        "BERT/RoBERTa directory")
    cfg = with_data_default(cfg)
    loaded = load(cfg.teacher, families=ENCODERS)
    teacher, tok = loaded.model, loaded.require_tokenizer(cfg.teacher)
    teacher.eval().requires_grad_(False).to(accel.resolve_device(cfg.train.device))
    arch = encoder_of(teacher).arch
    if cfg.max_len > arch.max_tokens:
        raise UserError(f"max_len {cfg.max_len} exceeds the teacher's {arch.max_tokens}")
    if getattr(teacher, "mlm", None) is None and dist.is_main():
        print(f"{cfg.teacher} has no MLM head: no soft targets (alpha_ce unused); the student "
              "learns from the cosine and MLM terms", file=sys.stderr)
    batches, val = _data(cfg, tok, arch.vocab_size)

    def create(run_dir: Path) -> tuple[Tokenizer, nn.Module]:
        if dist.is_main() and not (run_dir / TOKENIZER).exists():
            tok.save(run_dir / TOKENIZER)
        return tok, init_student(teacher, cfg.student_layers)

    run_dir, tok, student = setup_run(recipe, cfg, create)
    fit(student, make_loss(teacher, cfg), batches, cfg.train, run_dir,
        evaluate=make_evaluate(teacher, val))
    return final_report(run_dir, cfg, teacher, val) if dist.is_main() else {}


def final_report(run_dir: Path, cfg: DistilConfig, teacher: nn.Module,
                 val: list[MLMBatch]) -> dict:
    student = load(run_dir, families=["distilbert"]).model.to(next(teacher.parameters()).device)
    res = compare(teacher, student, val, cfg.speed_repeats)
    if cfg.downstream.data.train:
        res["downstream"] = run_downstream(cfg, run_dir)
    res["paper"] = PAPER
    write_json_atomic(run_dir / RESULTS, res)
    print_comparison(res)
    print(f"run directory: {run_dir}")
    return res


def evaluate(run_dir: Path, cfg: DistilConfig) -> dict:
    """`attnkit eval RUN`: the comparison again (downstream runs resume, i.e. are reused)."""
    teacher = load(cfg.teacher, families=ENCODERS).model
    _, val = _data(with_data_default(cfg), Tokenizer.load(run_dir / TOKENIZER),
                   encoder_of(teacher).arch.vocab_size)
    return final_report(run_dir, cfg, teacher.eval(), val)


def defaults() -> DistilConfig:
    """The reference code's loss weights; AdamW 5e-4 with warm-up, batches of 32 x 128."""
    return DistilConfig(
        train=TrainConfig(steps=1000, eval_every=250, save_every=250, log_every=25,
                          best_metric="val_mlm_loss",
                          optim=OptimConfig(name="adamw", lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                                            weight_decay=0.0, schedule="linear",
                                            warmup_steps=50)))
