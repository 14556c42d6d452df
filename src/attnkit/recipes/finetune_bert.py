"""The "finetune" recipe: fine-tune a BERT-family encoder on classify / tokens / qa records.

The run itself (encoder, head, records, training, report) is every fine-tuning run's
(:func:`attnkit.recipes.finetune.train_and_report`); this recipe gives BERT's settings.
"""

from __future__ import annotations

from attnkit.recipes.finetune import FinetuneConfig, train_and_report
from attnkit.train.loop import TrainConfig
from attnkit.train.optim import OptimConfig


def main(cfg: FinetuneConfig, recipe: str = "finetune") -> dict:
    """Fine-tune ``cfg.init`` with a ``cfg.task`` head on ``cfg.data``, then report."""
    return train_and_report(cfg, recipe)


def defaults() -> FinetuneConfig:
    """BERT's fine-tuning settings (section 4, appendix A.3) shortened for a CPU: AdamW 5e-5
    (2e-5..5e-5 in the paper), linear decay after 10% warm-up, batch 16."""
    return FinetuneConfig(train=TrainConfig(
        steps=300, eval_every=50, save_every=50, log_every=10, best_metric="val_f1",
        best_mode="max", optim=OptimConfig(name="adamw", lr=5e-5, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.01, schedule="linear",
                                           warmup_steps=30)))
