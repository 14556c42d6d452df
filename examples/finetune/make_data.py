"""Write the small fine-tuning example files in this folder (deterministic, seed 0).

- sentiment.csv: text,label (positive / negative film and food reviews), 240 rows
- ner.jsonl: {"tokens": [...], "tags": [...]} with BIO tags for PER and LOC, 200 sentences
- qa.jsonl: SQuAD-style {"question", "context", "answers": {"text", "answer_start"}}, 200 items

Usage: python examples/finetune/make_data.py
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
GOOD = ["wonderful", "delightful", "excellent", "brilliant", "lovely", "superb", "charming",
        "moving", "fantastic", "great"]
BAD = ["terrible", "boring", "awful", "dreadful", "dull", "bland", "painful", "weak",
       "disappointing", "poor"]
THINGS = ["film", "meal", "play", "soup", "novel", "concert", "pizza", "show", "album", "cake"]
FRAMES = ["The {thing} was {adj}.", "What a {adj} {thing}!", "I found the {thing} {adj}.",
          "Honestly, a {adj} {thing} from start to finish.",
          "My friends thought the {thing} was {adj}, and so did I.",
          "It is a {adj} {thing}, {adv}."]
ADVERBS = ["really", "truly", "without doubt", "all things considered", "I must say"]
NAMES = ["Alice", "Bruno", "Chen", "Dara", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
         "Kofi", "Lena"]
SURNAMES = ["Smith", "Rossi", "Wang", "Okafor", "Novak", "Silva"]
PLACES = ["Paris", "Lagos", "Oslo", "Lima", "Kyoto", "Boston", "Cairo", "Dublin", "Perth",
          "Quito"]
JOBS = ["teacher", "baker", "pilot", "nurse", "painter", "chemist", "farmer", "lawyer"]


def sentiment(rng: random.Random) -> list[dict]:
    rows = []
    for i in range(240):
        label = "positive" if i % 2 == 0 else "negative"
        adj = rng.choice(GOOD if label == "positive" else BAD)
        text = rng.choice(FRAMES).format(thing=rng.choice(THINGS), adj=adj,
                                         adv=rng.choice(ADVERBS))
        rows.append({"text": text, "label": label})
    return rows


def ner(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(200):
        person = [rng.choice(NAMES)] + ([rng.choice(SURNAMES)] if rng.random() < 0.5 else [])
        place = [rng.choice(PLACES)]
        frame = rng.choice([("P", "travelled to", "L", "."), ("Yesterday", "P", "arrived in",
                                                              "L", "."),
                            ("P", "lives near", "L", "with a cat", "."),
                            ("In", "L", ",", "P", "met a friend", ".")])
        tokens, tags = [], []
        for part in frame:
            words = person if part == "P" else place if part == "L" else part.split()
            kind = {"P": "PER", "L": "LOC"}.get(part)
            for j, w in enumerate(words):
                tokens.append(w)
                tags.append("O" if kind is None else ("B-" if j == 0 else "I-") + kind)
        out.append({"tokens": tokens, "tags": tags})
    return out


def qa(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(200):
        name, place, job = rng.choice(NAMES), rng.choice(PLACES), rng.choice(JOBS)
        context = (f"{name} grew up in {place}. After school, {name} became a {job} and "
                   f"still enjoys the work.")
        question, answer = rng.choice([(f"Where did {name} grow up?", place),
                                       (f"What did {name} become?", job),
                                       (f"Who became a {job}?", name)])
        start = context.index(answer) if answer != job else context.index(f"a {job}") + 2
        out.append({"question": question, "context": context,
                    "answers": {"text": [answer], "answer_start": [start]}})
    return out


def main() -> None:
    rng = random.Random(0)
    with open(HERE / "sentiment.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(sentiment(rng))
    for name, rows in (("ner.jsonl", ner(rng)), ("qa.jsonl", qa(rng))):
        with open(HERE / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
