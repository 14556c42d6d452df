"""Training: the one loop (:func:`fit`), optimisers and schedules, checkpoints, logs, DDP."""

from attnkit.train.checkpoint import latest_checkpoint, load_state, load_weights, save_checkpoint
from attnkit.train.distributed import init_distributed, is_main, wrap_ddp
from attnkit.train.loop import TrainConfig, TrainResult, fit
from attnkit.train.optim import OptimConfig, build_optimizer, build_scheduler, noam_lr

__all__ = ["OptimConfig", "TrainConfig", "TrainResult", "build_optimizer", "build_scheduler",
           "fit", "init_distributed", "is_main", "latest_checkpoint", "load_state",
           "load_weights", "noam_lr", "save_checkpoint", "wrap_ddp"]
