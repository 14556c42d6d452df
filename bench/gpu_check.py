"""The one prepared check for a CUDA machine: attnkit against `transformers` on the same weights.

Prints one markdown table and writes it as JSON (``gpu_check.json`` under ``--out``, default
``$OUT`` or the working directory):

- parity: GPT-2 small logits and BERT-base last hidden states in fp32 (TF32 off), max abs diff
  of the device against the CPU, for attnkit and for `transformers` (the scale of float noise),
  and attnkit against `transformers` on the device;
- training: one GPT-2 small (124M) step (forward, cross-entropy, backward, fused AdamW, bf16
  autocast, fp32 weights, dropout 0) in tokens/s and MFU, against `transformers`
  GPT2LMHeadModel (sdpa) and x-transformers (when importable) at the same shape. MFU = model
  FLOPs/token (attnkit.accel.flops_per_token: 6 N + 12 L T C, N the matmul parameters, so
  without the position embeddings) x tokens/s over the peak of a bf16 matmul measured in this
  run, and over the datasheet peak (attnkit.accel.PEAK_TFLOPS, the trainer's MFU table);
- generation: greedy, cached, fp32, ``min = max`` new tokens, attnkit ``generate`` against
  `transformers` ``generate`` at batch 1 and 8 (tokens/s; the tokens are compared too);
- BERT-base inference (``inference_mode``, bf16 autocast on a GPU, fp32 on a CPU) against
  `transformers` BertModel (sdpa), sequences/s.

All libraries run in one process, interleaved, medians of the repeats, the device synchronised
around each timed call. ``--tiny`` runs tiny shapes (a CPU does it in seconds: the test does).

x-transformers is not on the GPU image: its wheels travel (x-transformers, einx, frozendict,
loguru, torch-einops-utils; the device tool's README has the ``pip download`` line).

    PYTHONPATH=src python3 bench/gpu_check.py            # a CUDA machine, ~2-4 minutes
    PYTHONPATH=src python3 bench/gpu_check.py --tiny --device cpu --out /tmp/check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from attnkit import accel
from attnkit.convert import bert as cb
from attnkit.convert import gpt2 as cg
from attnkit.generation import GenerationConfig, generate
from attnkit.models.bert import bert_config

FULL = {"vocab": 50257, "layers": 12, "width": 768, "heads": 12, "positions": 1024,
        "batch": 16, "seq": 1024, "steps": 10, "warmup": 3, "new_tokens": 128, "prompt": 16,
        "bert_batch": 32, "bert_seq": 128, "repeats": 5, "matmul": 8192, "parity_seq": 128}
TINY = {"vocab": 97, "layers": 2, "width": 32, "heads": 2, "positions": 64,
        "batch": 2, "seq": 32, "steps": 2, "warmup": 1, "new_tokens": 6, "prompt": 4,
        "bert_batch": 2, "bert_seq": 16, "repeats": 2, "matmul": 128, "parity_seq": 16}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
                ) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds of each function (order alternating each round) and its last result."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    out: dict[str, object] = {}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            accel.synchronize(device)
            t0 = time.perf_counter()
            out[name] = fns[name]()
            accel.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, out


def matmul_peak(device: torch.device, size: int, repeats: int = 10) -> float:
    """FLOP/s of a bf16 size^3 matmul on ``device`` (best of ``repeats``)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats + 1):
        accel.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        accel.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def datasheet_peak(device: torch.device) -> tuple[float | None, str]:
    """(bf16 dense FLOP/s, source) from attnkit.accel.PEAK_TFLOPS, else (None, why)."""
    if device.type != "cuda":
        return None, "no datasheet peak for a CPU"
    name = torch.cuda.get_device_name(device)
    peak = accel.peak_flops(device, "bf16")
    if peak is None:
        return None, f"{name} has no bf16 row in attnkit.accel.PEAK_TFLOPS"
    return peak, f"{name}: attnkit.accel.PEAK_TFLOPS"


def gpt2_pair(s: dict) -> tuple[nn.Module, nn.Module, cg.GPT2Config]:
    """(transformers GPT2LMHeadModel with sdpa, attnkit GPT-2 with its weights), on the CPU."""
    torch.manual_seed(0)
    hc = transformers.GPT2Config(vocab_size=s["vocab"], n_positions=s["positions"],
                                 n_embd=s["width"], n_layer=s["layers"], n_head=s["heads"],
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                 bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    hf = transformers.GPT2LMHeadModel(hc)
    cfg = cg.config_from_hf(hc.to_dict())
    ours = cg.build(cfg)
    ours.load_state_dict(cg.state_from_hf(hf.state_dict(), cfg))
    return hf, ours, cfg


def bert_pair(s: dict) -> tuple[nn.Module, nn.Module]:
    """(transformers BertModel with sdpa, attnkit BERT with its weights), on the CPU."""
    torch.manual_seed(0)
    over = {} if s is FULL else {"n_layers": s["layers"], "d_model": s["width"],
                                 "n_heads": s["heads"], "d_ff": 4 * s["width"],
                                 "vocab_size": s["vocab"], "max_len": s["positions"]}
    cfg = bert_config("bert-base", **over)
    ours = cb.build(cfg)
    hf = transformers.BertModel(transformers.BertConfig(**cb.config_to_hf(cfg),
                                                        attn_implementation="sdpa"))
    hf.load_state_dict(cb.state_to_hf(ours.state_dict(), cfg), strict=True)
    return hf, ours


def output_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def parity(name: str, hf: nn.Module, ours: nn.Module, ids: torch.Tensor,
           device: torch.device) -> dict:
    """Max abs diffs in fp32: device vs CPU for each library, attnkit vs transformers."""
    got = {}
    with torch.inference_mode():
        for where in (torch.device("cpu"), device):
            for lib, model in (("attnkit", ours), ("transformers", hf)):
                model.to(where).eval()
                got[lib, where.type] = output_of(model, ids.to(where)).float().cpu()
    dev = device.type

    def diff(a: tuple[str, str], b: tuple[str, str]) -> float:
        return (got[a] - got[b]).abs().max().item()

    return {"check": f"parity {name} fp32 (max abs diff)", "unit": "max abs diff",
            "attnkit": diff(("attnkit", dev), ("attnkit", "cpu")),
            "transformers": diff(("transformers", dev), ("transformers", "cpu")),
            "attnkit vs transformers": diff(("attnkit", dev), ("transformers", dev)),
            "note": f"{dev} vs cpu per library; last column on {dev}"}


def xtransformers_model(s: dict) -> nn.Module | None:
    """x-transformers' decoder at the same shape, or None where it is not installed."""
    try:
        from x_transformers import Decoder, TransformerWrapper
    except ImportError:
        return None
    return TransformerWrapper(num_tokens=s["vocab"], max_seq_len=s["seq"], tie_embedding=True,
                              attn_layers=Decoder(dim=s["width"], depth=s["layers"],
                                                  heads=s["heads"], attn_flash=True))


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               device: torch.device) -> Callable[[], float]:
    """One bf16-autocast training step with a fused AdamW where the device has one."""
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    model.train()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x)
            logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def training(s: dict, device: torch.device, peak: float, sheet: float | None) -> list[dict]:
    """Tokens/s and MFU of one GPT-2 training step, three libraries at the same shape."""
    hf, ours, cfg = gpt2_pair(s)
    models = {"attnkit": ours, "transformers": hf, "x-transformers": xtransformers_model(s)}
    models = {k: m.to(device) for k, m in models.items() if m is not None}
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g).to(device)
    y = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g).to(device)
    steps = {k: train_step(m, x, y, device) for k, m in models.items()}
    for _ in range(s["warmup"]):
        for fn in steps.values():
            fn()
    secs, _ = interleaved(steps, s["steps"], device)
    rate = {k: s["batch"] * s["seq"] / t for k, t in secs.items()}
    fpt = accel.flops_per_token(accel.matmul_params(ours), cfg.n_layers, cfg.d_model, s["seq"])
    rows = [dict(_versus(rate), check="GPT-2 train step bf16", unit="tokens/s",
                 note=f"B={s['batch']} T={s['seq']}, {fpt / 1e6:.3g} MFLOP/token")]
    mfu = {k: r * fpt / peak for k, r in rate.items()}
    rows.append(dict(mfu, check="GPT-2 train MFU (measured bf16 matmul peak)", unit="MFU",
                     note=f"peak {peak / 1e12:.1f} TFLOP/s measured"))
    if sheet:
        rows.append(dict({k: r * fpt / sheet for k, r in rate.items()},
                         check="GPT-2 train MFU (datasheet peak)", unit="MFU",
                         note=f"peak {sheet / 1e12:.0f} TFLOP/s datasheet"))
    for m in models.values():
        m.cpu()
    return rows


def _versus(values: dict[str, float]) -> dict:
    """The values plus attnkit / transformers (> 1: attnkit is faster)."""
    return {**values, "attnkit vs transformers": values["attnkit"] / values["transformers"]}


def generation(s: dict, device: torch.device) -> list[dict]:
    """Greedy cached generation, tokens/s at batch 1 and 8, and whether the tokens agree."""
    hf, ours, _ = gpt2_pair(s)
    hf.to(device).eval()
    ours.to(device).eval()
    new, eos = s["new_tokens"], s["vocab"] - 1
    cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, eos_id=eos)
    rows = []
    for batch in (1, 8):
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, eos, (batch, s["prompt"]), generator=g).to(device)

        def run_hf(p: torch.Tensor = prompts) -> list[list[int]]:
            out = hf.generate(p, attention_mask=torch.ones_like(p), do_sample=False,
                              max_new_tokens=new, min_new_tokens=new, pad_token_id=eos)
            return out[:, p.size(1):].tolist()

        fns = {"attnkit": lambda p=prompts: generate(ours, p.tolist(), cfg),
               "transformers": run_hf}
        for fn in fns.values():
            fn()  # warm-up
        with torch.inference_mode():
            secs, out = interleaved(fns, s["repeats"], device)
        rate = {k: batch * new / t for k, t in secs.items()}
        same = out["attnkit"] == out["transformers"]
        rows.append(dict(_versus(rate), check=f"generate greedy batch {batch}",
                         unit="tokens/s", same_tokens=same,
                         note=f"{new} new tokens, fp32, same tokens: {'yes' if same else 'NO'}"))
    return rows


def bert_inference(s: dict, device: torch.device) -> dict:
    """Sequences/s of BERT inference, attnkit against transformers."""
    hf, ours = bert_pair(s)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1000 % s["vocab"], s["vocab"], (s["bert_batch"], s["bert_seq"]),
                        generator=g).to(device)
    mask = torch.ones_like(ids)
    bf16 = device.type == "cuda"

    def run(model: nn.Module) -> Callable[[], None]:
        model.to(device).eval()

        def call() -> None:
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with torch.inference_mode(), ctx:
                model(ids, attention_mask=mask)
        return call

    fns = {"attnkit": run(ours), "transformers": run(hf)}
    for fn in fns.values():
        fn()
    secs, _ = interleaved(fns, s["repeats"], device)
    rate = {k: s["bert_batch"] / t for k, t in secs.items()}
    return dict(_versus(rate), check="BERT-base inference", unit="sequences/s",
                note=f"B={s['bert_batch']} T={s['bert_seq']}, {'bf16' if bf16 else 'fp32'}")


COLUMNS = ("attnkit", "transformers", "x-transformers", "attnkit vs transformers")


def table(rows: list[dict]) -> str:
    """One markdown table: a row per check, a column per library."""
    def cell(v: object) -> str:
        if not isinstance(v, float):
            return "-" if v is None else str(v)
        if v == 0 or 1e-2 <= abs(v) < 100:
            return f"{v:.3g}"
        return f"{v:.2e}" if abs(v) < 1e-2 else f"{v:,.0f}"
    lines = ["| check | unit | " + " | ".join(COLUMNS) + " | note |",
             "|---|---|" + "---:|" * len(COLUMNS) + "---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['unit']} | "
                     + " | ".join(cell(r.get(c)) for c in COLUMNS) + f" | {r['note']} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """Every check on ``args.device``; the result as one JSON-ready dict."""
    s = TINY if args.tiny else FULL
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32 matmuls
    torch.backends.cudnn.allow_tf32 = False
    hf, ours, _ = gpt2_pair(s)
    g = torch.Generator().manual_seed(0)
    rows = [parity("GPT-2 logits", hf, ours,
                   torch.randint(0, s["vocab"], (2, s["parity_seq"]), generator=g), device)]
    hf, ours = bert_pair(s)
    rows.append(parity("BERT hidden", hf, ours, torch.randint(
        1, s["vocab"], (2, s["parity_seq"]), generator=g), device))
    del hf, ours
    peak = matmul_peak(device, s["matmul"])
    sheet, source = datasheet_peak(device)
    rows += training(s, device, peak, sheet)
    rows += generation(s, device)
    rows.append(bert_inference(s, device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return {"device": f"{device} ({name})", "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "shapes": "tiny" if args.tiny else "full", "matmul_peak_flops": peak,
            "datasheet_peak_flops": sheet, "datasheet_source": source, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (seconds on a CPU)")
    p.add_argument("--out", default=os.environ.get("OUT") or ".",
                   help="folder for gpu_check.json (default: $OUT, else .)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - start
    print(f"# gpu_check on {result['device']}: torch {result['torch']}, transformers "
          f"{result['transformers']}, python {result['python']}, {result['shapes']} shapes, "
          f"bf16 matmul peak {result['matmul_peak_flops'] / 1e12:.2f} TFLOP/s measured, "
          f"{result['seconds']:.0f} s")
    print(table(result["rows"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".gpu_check.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / "gpu_check.json")
    print(f"# written to {out / 'gpu_check.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
