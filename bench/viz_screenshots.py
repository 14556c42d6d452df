"""Screenshots of the attention views for docs/, and the long-input figures of docs/viz.md.

    PYTHONPATH=src .venv/bin/python bench/viz_screenshots.py [--out docs/img] [--tokens 512]

1. Trains a small encoder-decoder Transformer to reverse digit strings (~30 s on one core),
   renders its head (cross attention), model and neuron views in headless Chromium and saves
   docs/img/viz-{head,model,neuron}.png.
2. Measures a long input: synthetic softmax weights for 512 tokens x 12 layers x 12 heads
   (no model: the size and speed of a view depend only on these shapes), prints the HTML size,
   the Python rendering time, the page's own render time and the load time in Chromium.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from attnkit import viz  # noqa: E402
from attnkit.viz.capture import AttentionGroup, Capture  # noqa: E402
from test_viz_browser import start_browser  # noqa: E402


def train_reverse(work: Path) -> Path:
    """A small model trained for ~30 CPU seconds to reverse digit strings (clear patterns)."""
    from attnkit.cli import main as cli

    run = work / "reverse"
    sets = ["data.task=reverse", "data.max_len=12", "data.train_size=4000", "data.eval_size=20",
            "arch.d_model=64", "arch.d_ff=128", "arch.n_heads=4", "arch.n_encoder_layers=2",
            "arch.n_decoder_layers=2", "arch.dropout=0.0", "arch.max_len=32",
            "train.steps=400", "train.threads=1", "train.optim.warmup_steps=100",
            "train.eval_every=400", "train.save_every=400", "batch_tokens=1024",
            "eval_examples=20", f"run_dir={run}"]
    cli(["train", "copy", *[a for x in sets for a in ("--set", x)]])
    return run


def screenshots(driver, out: Path, work: Path) -> None:
    torch.manual_seed(0)
    model, tok = viz.load(train_reverse(work))
    cap = viz.capture_text(model, tok, "4815162342")
    groups = {"head": ["cross", "encoder", "decoder"], "model": None, "neuron": None}
    for view in ("head", "model", "neuron"):
        page = viz.render(cap, view, groups=groups[view],
                          title=f"attnkit {view} view: a Transformer trained to reverse digits")
        driver.get(page.save(work / f"{view}.html").resolve().as_uri())
        if view == "model":  # enlarge one head, as a reader would
            driver.execute_script("document.querySelectorAll('canvas.thumb')[5].click()")
        path = out / f"viz-{view}.png"
        driver.save_screenshot(str(path))
        print(f"{path}: {path.stat().st_size / 1024:.0f} KB")


def synthetic(tokens: int, layers: int, heads: int) -> Capture:
    g = torch.Generator().manual_seed(0)
    names = [f"t{i}" for i in range(tokens)]
    weights = [torch.softmax(torch.randn(heads, tokens, tokens, generator=g) * 3, -1)
               for _ in range(layers)]
    return Capture({"encoder": AttentionGroup("encoder", weights, names, names)})


INTERACT = """
const t0 = performance.now();
const s = document.querySelector('select.layer-select');
s.value = '5'; s.dispatchEvent(new Event('change'));
const t1 = performance.now();
document.querySelector('text.tok-left').dispatchEvent(new Event('mouseenter'));
const t2 = performance.now();
return `layer switch ${Math.round(t1 - t0)} ms, hover ${Math.round(t2 - t1)} ms`;
"""


def measure(driver, tokens: int, work: Path) -> None:
    cap = synthetic(tokens, 12, 12)
    for view in ("head", "model"):
        start = time.perf_counter()
        page = viz.render(cap, view)
        python_s = time.perf_counter() - start
        path = page.save(work / f"long-{view}.html")
        start = time.perf_counter()
        driver.get(path.resolve().as_uri())
        load_s = time.perf_counter() - start
        root = driver.find_element("id", "attnkit-root")
        lines = driver.execute_script("return document.querySelectorAll('line').length")
        extra = ""
        if view == "head":
            extra = ", " + driver.execute_script(INTERACT)
        print(f"{view} view, {tokens} tokens x 12 layers x 12 heads: "
              f"HTML {path.stat().st_size / 1e6:.1f} MB, Python render {python_s:.1f} s, "
              f"page render {int(root.get_attribute('data-render-ms')) / 1000:.2f} s, "
              f"Chromium load {load_s:.1f} s, {lines} lines drawn{extra}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/img")
    p.add_argument("--tokens", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        driver = start_browser(str(Path(work) / "profile"))
        try:
            driver.set_window_size(1000, 640)
            screenshots(driver, out, Path(work))
            driver.set_page_load_timeout(600)
            measure(driver, args.tokens, Path(work))
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
