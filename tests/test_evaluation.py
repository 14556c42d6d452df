"""Exact match, BLEU and perplexity of attnkit.evaluation against values counted by hand
(clipped n-gram precisions and brevity penalty as in Papineni et al. 2002) and against
sacrebleu called directly with the settings the docstring names."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import sacrebleu

from attnkit.evaluation import METRICS, bits_per_character, bleu, exact_match, perplexity


def test_exact_match_against_a_hand_count():
    hyps = [" 42", "42 ", "\t7\n", "4 2", "-3", "x", "Yes", "", "  "]
    refs = ["42", "42", "7", "42", "-3.0", "X", "Yes", "", "0"]
    # right: outer whitespace ignored (" 42", "42 ", "\t7\n"), "Yes", "" == ""  -> 5 of 9;
    # wrong: inner space kept ("4 2"), no numeric equality ("-3"), case kept ("x"), "  " != "0"
    assert exact_match(hyps, refs) == {"exact_match": 5 / 9}
    assert METRICS["exact_match"] is exact_match
    assert exact_match([], []) == {"exact_match": 0.0}
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        exact_match(["a", "b"], ["a"])


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _hand_bleu(hyps: list[list[str]], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 (one reference, no smoothing): clipped matches and hypothesis n-grams
    summed over the corpus, geometric mean of the four precisions, brevity penalty."""
    log_p = 0.0
    for n in range(1, 5):
        matched = sum(sum((_ngrams(h, n) & _ngrams(r, n)).values())
                      for h, r in zip(hyps, refs, strict=True))
        total = sum(max(0, len(h) - n + 1) for h in hyps)
        log_p += math.log(matched / total) / 4
    c, r = sum(map(len, hyps)), sum(map(len, refs))
    return 100 * (1.0 if c > r else math.exp(1 - r / c)) * math.exp(log_p)


def test_bleu_against_clipped_precisions_and_brevity_penalty_by_hand():
    hyps = ["the cat sat on the mat", "a quick brown fox jumps"]
    refs = ["the cat sat on a mat", "the quick brown fox jumps over"]
    # sentence 1: 1-grams 5/6 ("the" clipped to 1), 2-grams 3/5, 3-grams 2/4, 4-grams 1/3;
    # sentence 2: 4/5, 3/4, 2/3, 1/2. Corpus: 9/11, 6/9, 4/7, 2/5; c = 11 < r = 12.
    by_hand = 100 * math.exp(1 - 12 / 11) * (9 / 11 * 6 / 9 * 4 / 7 * 2 / 5) ** 0.25
    assert by_hand == pytest.approx(54.258, abs=1e-3)
    assert _hand_bleu([h.split() for h in hyps], [r.split() for r in refs]) == \
        pytest.approx(by_hand, rel=1e-12)
    # corpus BLEU: the mean of the two sentence BLEUs would be 54.240
    assert bleu(hyps, refs)["bleu"] == pytest.approx(by_hand, rel=1e-9)


def test_bleu_tokenises_punctuation_like_13a():
    hyps = ["Two dogs run, quickly.", "A man is cooking!"]
    refs = ["Two dogs run quickly.", "A man is cooking food!"]
    # 13a splits the punctuation off the words; the case is kept
    hyp_tokens = [["Two", "dogs", "run", ",", "quickly", "."], ["A", "man", "is", "cooking", "!"]]
    ref_tokens = [["Two", "dogs", "run", "quickly", "."], ["A", "man", "is", "cooking", "food",
                                                          "!"]]
    assert bleu(hyps, refs)["bleu"] == pytest.approx(_hand_bleu(hyp_tokens, ref_tokens),
                                                     rel=1e-9)
    lower = bleu([h.lower() for h in hyps], refs)["bleu"]
    assert lower < bleu(hyps, refs)["bleu"]  # "two" is not "Two"


def test_bleu_equals_sacrebleu_with_its_default_settings_on_known_pairs():
    rng = random.Random(0)
    words = "a the man woman dog runs walks on in park street red blue .".split()
    refs = [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(40)]
    hyps = [" ".join(w for w in r.split() if rng.random() > 0.25) for r in refs]
    hyps[3] = "completely different words"  # no overlap at all in one sentence
    reference = sacrebleu.BLEU(tokenize="13a", lowercase=False, smooth_method="exp")
    assert bleu(hyps, refs)["bleu"] == pytest.approx(
        reference.corpus_score(hyps, [refs]).score, rel=1e-12)
    assert bleu(refs, refs)["bleu"] == pytest.approx(100.0)
    assert bleu(["x y z w"], ["a b c d"])["bleu"] == 0.0
    assert METRICS["bleu"] is bleu
    with pytest.raises(ValueError):
        bleu(hyps[:-1], refs)


def test_perplexity_and_bpc_from_hand_sums_of_log_probabilities():
    rng = random.Random(1)
    probs = [rng.uniform(0.01, 1.0) for _ in range(50)]  # p(target) of 50 tokens
    nll = -math.fsum(math.log(p) for p in probs)  # float64
    # perplexity = geometric mean of 1 / p
    geometric = math.prod(1 / p for p in probs) ** (1 / len(probs))
    assert perplexity(nll, len(probs)) == pytest.approx(geometric, rel=1e-12)
    # bits per character: the same tokens standing for 137 characters, in bits (log base 2)
    bits = -math.fsum(math.log2(p) for p in probs)
    assert bits_per_character(nll, 137) == pytest.approx(bits / 137, rel=1e-12)
    assert perplexity(50 * math.log(17), 50) == pytest.approx(17.0, rel=1e-12)  # uniform, V=17
    assert perplexity(0.0, 0) == 1.0
