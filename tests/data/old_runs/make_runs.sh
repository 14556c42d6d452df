#!/usr/bin/env bash
# Rebuild the tiny runs of the release before the family table (commit d09adca).
# Usage, from this folder, with OLD = a checkout of d09adca:
#   PYTHON=/path/to/python OLD=/path/to/d09adca bash make_runs.sh
# Paths are relative to this folder, as a user's would be; the tests run from a copy of it.
set -euo pipefail
: "${PYTHON:?set PYTHON}" "${OLD:?set OLD to a checkout of d09adca}"
export PYTHONPATH="$OLD/src" ATTNKIT_CACHE="$PWD/.cache" OMP_NUM_THREADS=1
rm -rf runs .cache && mkdir -p data runs

attnkit() { "$PYTHON" -m attnkit "$@"; }
train() {  # train RECIPE RUN SETTING...
    local recipe=$1 run=$2; shift 2
    local args=()
    for s in "$@" train.steps=2 train.eval_every=2 train.save_every=1 train.log_every=1 \
             train.threads=1 "run_dir=runs/$run"; do args+=(--set "$s"); done
    attnkit train "$recipe" "${args[@]}" > /dev/null
}

"$PYTHON" - <<'PY'
from pathlib import Path
lines = [f"the {w} sat on the {v} mat ." for w in ("cat", "dog", "fox") for v in ("red", "blue")]
Path("data/text.txt").write_text("\n\n".join(lines) * 6, encoding="utf-8")
de = ["null", "eins", "zwei", "drei", "vier", "fuenf", "sechs", "sieben"]
en = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
for split, rows in (("train", range(40)), ("valid", range(100, 108))):
    pairs = []
    for i in rows:
        d = [(i * 7 + k * 3) % 8 for k in range(2 + i % 3)]
        pairs.append((" ".join(de[x] for x in d), " ".join(en[x] for x in reversed(d))))
    for side, k in (("src", 0), ("tgt", 1)):
        Path(f"data/{split}.{side}").write_text("".join(p[k] + "\n" for p in pairs))
rows = ["text,label"] + [f"the {w} was {m},{m}" for w in ("cat", "dog", "fox", "film")
                         for m in ("good", "bad")] * 3
Path("data/sentiment.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
PY

SEQ2SEQ=(arch.d_model=8 arch.d_ff=16 arch.n_heads=2 arch.n_encoder_layers=1
         arch.n_decoder_layers=1 arch.max_len=32)
RNN=(model=rnn-attention preset=tiny arch.embed_size=8 arch.hidden_size=8 arch.n_layers=1
     arch.max_len=32)
COPY=(data.max_len=5 data.train_size=60 data.eval_size=4 eval_examples=2 batch_tokens=128
      decode.beam_size=2)
MATH=(arch.max_len=64 data.train_size=40 data.eval_size=4 eval_examples=2 batch_tokens=256)
LM=(arch.n_layers=1 arch.d_model=8 arch.n_heads=2 block_size=16 batch_size=4 sample.n=0
    eval.batch_size=16 data.train=data/text.txt)
XL=(seg_len=8 batch_size=2 arch.d_model=8 arch.n_heads=2 arch.n_layers=1 arch.d_ff=16
    arch.mem_len=8 eval.max_chars=200 sample.n=0 data.train=data/text.txt)
BERT=(max_len=24 batch_size=4 tokenizer.vocab_size=60 arch.d_model=8 arch.d_ff=16
      arch.n_heads=2 arch.n_layers=1 data.train=data/text.txt)

train math-demo math-demo "${SEQ2SEQ[@]}" "${MATH[@]}"
train translate translate "${SEQ2SEQ[@]}" tokenizer.vocab_size=60 eval_examples=4 \
    decode.beam_size=2 data.train_src=data/train.src data.train_tgt=data/train.tgt \
    data.valid_src=data/valid.src data.valid_tgt=data/valid.tgt
train copy copy "${SEQ2SEQ[@]}" "${COPY[@]}"
train copy copy-rnn "${RNN[@]}" "${COPY[@]}"
train lm lm "${LM[@]}"
train lm lm-xl "${LM[@]}" model=transformer-xl arch.d_ff=16 arch.mem_len=8
train xl-lm xl-lm "${XL[@]}"
train bert-pretrain bert "${BERT[@]}"
train roberta-pretrain roberta "${BERT[@]}" train.accum_steps=1
train distil distil teacher=runs/bert data.train=data/text.txt max_len=24 batch_size=4 \
    speed_repeats=1
train finetune finetune init=runs/bert data.train=data/sentiment.csv max_len=24 batch_size=4
attnkit export runs/lm data/gpt2-hf > /dev/null
train finetune-lm finetune-lm init=data/gpt2-hf data.train=data/text.txt block_size=16 \
    batch_size=4 sample.n=0
train pointer-sort pointer arch.d_model=8 data.min_len=2 data.max_len=3 data.eval_size=4 \
    batch_size=4
train ntm-copy ntm arch.controller_size=8 arch.memory_size=8 arch.memory_width=4 \
    data.width=4 data.max_len=2 data.eval_size=4 batch_size=4
train act-parity act hidden_size=8 max_steps=3 data.size=4 data.eval_size=8 batch_size=8
rm -rf .cache
# what the old release answers, for the tests to compare with: exports of the encoder runs,
# and expected.json (greedy and beam outputs of generate/translate, the data of viz pages)
for run in bert roberta distil finetune-lm; do attnkit export runs/$run "data/$run-hf" > /dev/null; done
"$PYTHON" - <<'PY'
import json, re, subprocess, sys
def cli(*args):
    done = subprocess.run([sys.executable, "-m", "attnkit", *args], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None
expected = {"generate": {}, "translate": {}, "viz": {}}
for run in ("lm", "lm-xl", "xl-lm", "finetune-lm"):
    expected["generate"][run] = cli("generate", f"runs/{run}", "the c", "--greedy",
                                    "--max-new-tokens", "8")
for run in ("copy", "copy-rnn", "math-demo", "translate"):
    expected["translate"][run] = cli("translate", f"runs/{run}", "12", "eins zwei")
texts = {"copy": "123", "copy-rnn": "123", "math-demo": "1+2", "translate": "eins zwei",
         "lm": "the cat", "finetune-lm": "the cat", "bert": "the cat", "roberta": "the cat"}
for run, text in texts.items():
    if cli("viz", f"runs/{run}", text, "-o", "view.html") is not None:
        page = open("view.html", encoding="utf-8").read()
        data = re.search(r'<script type="application/json" id="attnkit-data">(.*?)</script>',
                         page, re.S).group(1)
        expected["viz"][run] = {"text": text, "data": json.loads(data)}
open("expected.json", "w").write(json.dumps(expected, indent=1, sort_keys=True) + "\n")
PY
rm -f view.html view.png

# what the tests do not read: the loss plot, the state beside best (nothing reads it) and the
# final step's state (the tests resume from step 1's, as after a kill during step 2)
rm -f runs/*/plots/loss.png runs/*/checkpoints/{best,step-000002}.state.pt
rmdir runs/*/plots
