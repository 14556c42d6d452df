"""Benchmark: "the fall of RNN". The attentional RNN, the RNN without attention and the
Transformer trained on the same task for the same wall-clock budget each, through the ordinary
recipes and run directories (``attnkit train math|translate --set model=...``).

Each run gets ``--minutes`` of *training* time: the bench starts ``attnkit train`` with an
open-ended step count, timestamps every record of the run's metrics.jsonl as it arrives, takes
the time spent evaluating (the gap between the training record and the evaluation record of the
same step) out of the trainer's ``elapsed``, and interrupts the run (SIGINT) when the remaining
training time reaches the budget. It then reports, from metrics.jsonl, the metric (math
exact match on interpolate problems, Multi30k BLEU) reached against training time and the
training throughput (median target tokens/s of logging windows without an evaluation), as a
markdown table and a PNG plot. Runs are sequential: record the load (the table shows the
1-minute load average during each run) and compare runs made on a quiet machine only.

    .venv/bin/python bench/fall_of_rnn.py --minutes 10                 # math and Multi30k
    .venv/bin/python bench/fall_of_rnn.py --tasks math --minutes 1 --threads 1
    .venv/bin/python bench/fall_of_rnn.py --report-only                # redraw from the runs
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("rnn-attention", "rnn", "transformer")
LABELS = {"rnn-attention": "attentional RNN (Bahdanau, bi-GRU)", "rnn": "RNN, no attention",
          "transformer": "Transformer"}

# Per task: the recipe, the watched metric, settings shared by every model, and per model its
# family, preset and architecture. Optimiser settings are the same for all three models.
TASKS: dict[str, dict] = {
    "math": {
        "recipe": "math", "metric": "interpolate_exact_match",
        "label": "add_or_sub interpolate exact match (%)", "scale": 100.0,
        "common": ["data.train_size=60000", "data.eval_size=500", "eval_examples=200",
                   "batch_tokens=2048", "label_smoothing=0.0", "train.optim.lr=0.002",
                   "train.optim.warmup_steps=200", "train.optim.schedule=inverse_sqrt",
                   "decode.beam_size=1"],
        "eval_every": 200,
        "models": {
            # the math-demo Transformer (BENCHMARKS.md)
            "transformer": ["preset=tiny", 'arch={"d_model": 128, "n_heads": 4, '
                            '"n_encoder_layers": 2, "n_decoder_layers": 2, "d_ff": 512, '
                            '"dropout": 0.0, "norm_first": true, "max_len": 256}'],
            "rnn-attention": ["preset=small", 'arch={"dropout": 0.0, "max_len": 256}'],
            "rnn": ["preset=small", 'arch={"dropout": 0.0, "max_len": 256}'],
        },
    },
    "translate": {
        "recipe": "translate", "metric": "val_bleu", "label": "Multi30k de-en BLEU (greedy)",
        "scale": 1.0,
        "common": ["data.src=de", "data.tgt=en", "eval_examples=300", "batch_tokens=4096",
                   "label_smoothing=0.1", "train.optim.lr=0.001", "train.optim.warmup_steps=800",
                   "train.optim.schedule=inverse_sqrt", "train.best_metric="],
        "eval_every": 100,
        "models": {
            "transformer": ["preset=small"],
            "rnn-attention": ["preset=small"],
            "rnn": ["preset=small"],
        },
    },
}


# ---- running -------------------------------------------------------------------------------------
def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _command(task: str, model: str, run_dir: Path, threads: int, multi30k: str,
             eval_every: int | None) -> list[str]:
    spec = TASKS[task]
    every = eval_every or spec["eval_every"]
    items = [f"model={model}", *spec["models"][model], *spec["common"],
             "train.steps=10000000", "train.log_every=10", f"train.eval_every={every}",
             f"train.save_every={5 * every}", "train.keep_last=1", f"train.threads={threads}",
             f"run_dir={run_dir}"]
    if task == "translate":
        items.append(f"data.dir={multi30k}")
    return [sys.executable, "-m", "attnkit", "train", spec["recipe"], *_sets(items)]


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def training_time(records: list[tuple[float, dict]]) -> tuple[list[dict], float]:
    """Evaluation points with their training time, and the training time of the last record.

    ``records`` are (arrival time, record) in file order. The trainer's ``elapsed`` counts
    evaluations too; each one's duration is the gap between the training record of its step
    and its own record, which are written back to back around it.
    """
    spent, trained, train_arrival, points = 0.0, 0.0, {}, []
    for arrival, r in records:
        if "loss" in r:
            trained = r["elapsed"] - spent
            train_arrival[r["step"]] = (arrival, trained)
        elif isinstance(r.get("eval"), dict) and r["step"] in train_arrival:
            start, at = train_arrival[r["step"]]
            spent += max(0.0, arrival - start)
            points.append({"step": r["step"], "train_seconds": at, **r["eval"]})
    return points, trained


def run_one(task: str, model: str, out: Path, minutes: float, threads: int,
            multi30k: str, eval_every: int | None = None) -> Path:
    """Train ``model`` on ``task`` for ``minutes`` of training time; returns the run dir."""
    run_dir = out / f"{task}-{model}"
    if run_dir.exists():
        sys.exit(f"{run_dir} exists: remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads),
           "TQDM_DISABLE": "1"}
    log = (out / f"{task}-{model}.log").open("w")
    proc = subprocess.Popen(_command(task, model, run_dir, threads, multi30k, eval_every), cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    arrived: list[tuple[float, dict]] = []
    loads, seen, stopped = [], 0, False
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        time.sleep(0.2)
        lines = metrics.read_text().split("\n")[:-1] if metrics.exists() else []
        now = time.time()
        arrived += [(now, json.loads(line)) for line in lines[seen:]]
        seen = len(lines)
        if arrived and (not loads or now - loads[-1][0] > 10):
            loads.append((now, _load()))
        if not stopped and training_time(arrived)[1] >= 60 * minutes:
            proc.send_signal(signal.SIGINT)  # the CLI stops; the run stays resumable
            stopped = True
    log.close()
    if not stopped:
        sys.exit(f"{task}/{model} ended early (exit {proc.returncode}); see {log.name}")
    timing = {"arrivals": [t for t, _ in arrived], "load": [x for _, x in loads],
              "minutes": minutes, "threads": threads}
    (run_dir / "bench_timing.json").write_text(json.dumps(timing))
    return run_dir


# ---- reporting -----------------------------------------------------------------------------------
def summarise(task: str, model: str, run_dir: Path) -> dict:
    """What one run reached: the curve, the last evaluation, throughput, load, parameters."""
    timing = json.loads((run_dir / "bench_timing.json").read_text())
    from attnkit.rundir import read_metrics

    records = read_metrics(run_dir)
    arrived = list(zip(timing["arrivals"], records, strict=False))
    points, trained = training_time(arrived)
    evaluated = {p["step"] for p in points}
    rates = [r["tokens_per_s"] for r in records if "loss" in r and r["step"] > 10
             and r["step"] - 10 not in evaluated]
    steps = max(r["step"] for r in records if "loss" in r)
    last = points[-1] if points else {}
    metric = TASKS[task]["metric"]
    return {"task": task, "model": model, "points": points, "steps": steps,
            "train_minutes": trained / 60, "tokens_per_s": statistics.median(rates),
            "metric": last.get(metric), "metric_minutes": last.get("train_seconds", 0) / 60,
            "val_loss": last.get("val_loss"), "params": _params(run_dir),
            "load": statistics.mean(timing["load"]) if timing["load"] else float("nan"),
            "threads": timing["threads"]}


def _params(run_dir: Path) -> int:
    from attnkit.models import build_seq2seq

    record = json.loads((run_dir / "config.json").read_text())
    config = dict(record["model"]["config"])
    src, tgt = config.pop("src_vocab_size"), config.pop("tgt_vocab_size")
    model, _ = build_seq2seq(record["model"]["family"], record["config"]["preset"], config,
                             src, tgt)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def table(rows: list[dict]) -> str:
    lines = ["| task | model | parameters | steps | training time | tokens/s | metric (at) | "
             "val loss | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spec = TASKS[r["task"]]
        metric = ("-" if r["metric"] is None else
                  f"{spec['scale'] * r['metric']:.1f} ({r['metric_minutes']:.1f} min)")
        loss = "-" if r["val_loss"] is None else f"{r['val_loss']:.3f}"
        lines.append(f"| {r['task']} | {LABELS[r['model']]} | {r['params']:,} | {r['steps']} | "
                     f"{r['train_minutes']:.1f} min | {r['tokens_per_s']:,.0f} | {metric} | "
                     f"{loss} | {r['load']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.6 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        spec = TASKS[task]
        for r in (r for r in rows if r["task"] == task):
            x = [p["train_seconds"] / 60 for p in r["points"]]
            axes[i][0].plot(x, [spec["scale"] * p[spec["metric"]] for p in r["points"]],
                            marker=".", label=LABELS[r["model"]])
            axes[i][1].plot(x, [p["val_loss"] for p in r["points"]], marker=".",
                            label=LABELS[r["model"]])
        axes[i][0].set_ylabel(spec["label"])
        axes[i][1].set_ylabel(f"{task}: validation loss (nats/token)")
        for ax in axes[i]:
            ax.set_xlabel("training time (minutes)")
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--minutes", type=float, default=10.0, help="training minutes per run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default: "
                   + ", ".join(f"{k} {v['eval_every']}" for k, v in TASKS.items()) + ")")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "fall-of-rnn")
    p.add_argument("--png", type=Path, default=None, help="default: OUT/fall_of_rnn.png")
    p.add_argument("--multi30k", default=str(ROOT.parent / "shared" / "data" / "multi30k"))
    p.add_argument("--report-only", action="store_true", help="only report existing runs")
    args = p.parse_args()
    # a shell's background job ignores SIGINT, and so would the runs it starts: restore it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rows = []
    for task in args.tasks:
        for model in args.models:
            run_dir = args.out / f"{task}-{model}"
            if not args.report_only:
                print(f"training {model} on {task} for {args.minutes} min ...", flush=True)
                run_one(task, model, args.out, args.minutes, args.threads, args.multi30k,
                        args.eval_every)
            rows.append(summarise(task, model, run_dir))
    text = table(rows)
    png = args.png or args.out / "fall_of_rnn.png"
    plot(rows, png)
    (args.out / "fall_of_rnn.md").write_text(text + "\n")
    (args.out / "fall_of_rnn.json").write_text(json.dumps(rows, indent=1))
    print(text)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
