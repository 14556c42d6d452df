"""A tiny resumable training setup for the trainer tests, also a subprocess entry point.

Batches are token-classification problems generated from (seed, index) alone, with a random
number of valid tokens per row, so micro-batches and shards carry unequal token counts.

    python tests/_train_script.py --run-dir DIR --steps 12 --out final.safetensors
    python -m torch.distributed.run --nproc-per-node 2 --standalone tests/_train_script.py ...
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FEATURES, CLASSES, WIDTH, LENGTH = 6, 5, 16, 7


@dataclass
class Batch:
    x: torch.Tensor  # (B, T, FEATURES)
    y: torch.Tensor  # (B, T) class ids
    mask: torch.Tensor  # (B, T) True = a real token

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.x.to(device), self.y.to(device), self.mask.to(device))

    def shard(self, rank: int, world: int) -> Batch:
        return Batch(self.x[rank::world], self.y[rank::world], self.mask[rank::world])

    def rows(self, start: int, stop: int) -> Batch:
        return Batch(self.x[start:stop], self.y[start:stop], self.mask[start:stop])


def make_batch(seed: int, index: int, rows: int) -> Batch:
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    x = torch.randn(rows, LENGTH, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (rows, LENGTH), generator=g)
    lengths = torch.randint(1, LENGTH + 1, (rows,), generator=g)
    mask = torch.arange(LENGTH)[None, :] < lengths[:, None]
    return Batch(x, y, mask)


class RandomBatches:
    """An endless stream; ``state_dict()`` is the index of the next batch to yield."""

    def __init__(self, seed: int = 0, rows: int = 8):
        self.seed, self.rows, self.index = seed, rows, 0

    def __iter__(self):
        while True:
            batch = make_batch(self.seed, self.index, self.rows)
            self.index += 1
            yield batch

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


class HalfBatches(RandomBatches):
    """The same batches as RandomBatches, each split into two unequal micro-batches."""

    def __init__(self, seed: int = 0, rows: int = 8, split: int = 3):
        super().__init__(seed, rows)
        self.split = split

    def __iter__(self):
        while True:
            full = make_batch(self.seed, self.index // 2, self.rows)
            part = full.rows(0, self.split) if self.index % 2 == 0 else \
                full.rows(self.split, self.rows)
            self.index += 1
            yield part


class TinyModel(nn.Module):
    """Embedding of a feature-derived id + MLP with dropout + LayerNorm: every param kind."""

    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.inp = nn.Linear(FEATURES, WIDTH)
        self.emb = nn.Embedding(3, WIDTH)
        self.hidden = nn.Linear(WIDTH, WIDTH)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(WIDTH)
        self.out = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, F) -> (B, T, CLASSES)
        ids = (x[..., 0] > 0).long() + (x[..., 1] > 1).long()  # (B, T) in {0, 1, 2}
        h = self.drop(torch.relu(self.inp(x) + self.emb(ids)))
        return self.out(self.norm(h + self.drop(torch.relu(self.hidden(h)))))


def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over real tokens, and their number."""
    logits = model(batch.x)  # (B, T, CLASSES)
    losses = F.cross_entropy(logits.transpose(1, 2), batch.y, reduction="none")  # (B, T)
    return (losses * batch.mask).sum(), int(batch.mask.sum())


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from safetensors.torch import save_file

    from attnkit.train import OptimConfig, TrainConfig, fit
    from attnkit.train.distributed import is_main, shutdown_distributed

    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--delay", type=float, default=0.0)  # seconds per micro-batch (kill window)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyModel(args.dropout)

    def slow_loss(m: nn.Module, b: Batch) -> tuple[torch.Tensor, int]:
        time.sleep(args.delay)
        return loss_fn(m, b)

    cfg = TrainConfig(steps=args.steps, accum_steps=args.accum, save_every=args.save_every,
                      log_every=1, eval_every=0, keep_last=2, seed=3,
                      optim=OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1,
                                        schedule="cosine", warmup_steps=3))
    result = fit(model, slow_loss, RandomBatches(seed=7, rows=args.rows), cfg, args.run_dir,
                 progress=False)
    if is_main():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
        print(f"done step {result.step} tokens {result.tokens}", flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
