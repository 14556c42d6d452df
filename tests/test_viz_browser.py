"""attnkit.viz in a real browser: headless Chromium driven by Selenium, no network.

Skipped (with the reason) only when Chromium, chromedriver or selenium is not installed:
`make test` does not install a browser; `.ci/run` runs ``apt-get install chromium
chromium-driver`` first, and so can you (INSTALL below).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from attnkit import viz
from attnkit.models.transformer import Transformer, transformer_config

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "apt-get install chromium chromium-driver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-gpu",
         "--disable-dev-shm-usage", "--disable-default-apps", "--disable-extensions",
         "--window-size=1100,800"]
# tokens that would run or break markup if they ever reached the page as HTML
NASTY = ["<script>window.__pwned=1</script>", "<img src=x onerror=window.__pwned=2>", '"',
         "&amp;", "</div>", "<b>bold</b>", "ok"]


def start_browser(user_data_dir: str):
    """Headless Chromium through /usr/bin/chromedriver (Selenium Manager never runs)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={user_data_dir}"]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.skip(f"browser tests need Chromium: {', '.join(missing)} missing; install "
                    f"with `{INSTALL}` (Debian/Ubuntu, as root)")
    pytest.importorskip("selenium", reason="browser tests need selenium (pip install selenium)")
    profile = tempfile.mkdtemp(prefix="attnkit-chromium-")
    driver = start_browser(profile)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


class WordTokenizer:
    """Tokens separated by "|", any string allowed; enough for a capture."""

    bos_id, eos_id = 1, 2

    def __init__(self, words: list[str]) -> None:
        self.words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", *words]

    def encode(self, text: str) -> list[int]:
        return [self.words.index(w) for w in text.split("|")]

    def token(self, i: int) -> str:
        return self.words[i]


@pytest.fixture(scope="module")
def setup() -> tuple[Transformer, WordTokenizer]:
    torch.manual_seed(0)
    tok = WordTokenizer(NASTY)
    cfg = transformer_config("tiny", src_vocab_size=len(tok.words), d_model=32, n_heads=4,
                             d_ff=64, n_encoder_layers=2, n_decoder_layers=3, dropout=0.0)
    return Transformer(cfg).eval(), tok


TEXT, TARGET = "|".join(NASTY), "ok|</div>|&amp;"


def open_view(browser, page: viz.View, tmp_path: Path, name: str):
    from selenium.webdriver.common.by import By

    path = page.save(tmp_path / f"{name}.html")
    browser.get(path.resolve().as_uri())
    root = browser.find_element(By.ID, "attnkit-root")
    assert root.get_attribute("data-ready") == "1"
    return root


def assert_nothing_ran(browser) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.find_elements(By.CSS_SELECTOR, "#attnkit-root img, #attnkit-root b") == []
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 2
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018


def lines(browser) -> list[tuple[int, int, int, float]]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('line.attn-line')).map(l => ["
        "+l.dataset.head, +l.dataset.row, +l.dataset.col, +l.dataset.w])")


def test_head_view(browser, setup, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    model, tok = setup
    cap = viz.capture_text(model, tok, TEXT, target=TARGET)
    root = open_view(browser, viz.render(cap, "head", min_weight=0.0), tmp_path, "head")
    assert_nothing_ran(browser)
    left = [e.text for e in root.find_elements(By.CSS_SELECTOR, "text.tok-left")]
    assert left == NASTY  # shown as text, exactly
    assert len(root.find_elements(By.CSS_SELECTOR, ".head-toggle")) == 4
    layer = Select(root.find_element(By.CSS_SELECTOR, "select.layer-select"))
    assert len(layer.options) == 2
    shown = lines(browser)
    t = len(NASTY)
    assert len(shown) == 4 * t * t  # min_weight 0: every head, query and key
    w0 = cap.group("encoder").weights[0]
    for h, i, j, w in shown[:50]:
        assert abs(w - w0[h, i, j].item()) <= 0.003  # 1/255 quantisation, printed to 3 places
    layer.select_by_index(1)
    w1 = cap.group("encoder").weights[1]
    for h, i, j, w in lines(browser)[:50]:
        assert abs(w - w1[h, i, j].item()) <= 0.003
    # hovering a token isolates its attention; clicking pins it
    token = root.find_elements(By.CSS_SELECTOR, "text.tok-left")[2]
    ActionChains(browser).move_to_element(token).perform()
    assert {i for _, i, _, _ in lines(browser)} == {2}
    assert "active" in token.get_attribute("class")
    token.click()
    ActionChains(browser).move_to_element(root.find_element(By.TAG_NAME, "h2")).perform()
    assert {i for _, i, _, _ in lines(browser)} == {2}
    token.click()  # unpinned, but the pointer still hovers over it
    ActionChains(browser).move_to_element(root.find_element(By.TAG_NAME, "h2")).perform()
    assert len({i for _, i, _, _ in lines(browser)}) == t
    # a head toggle removes that head's lines
    root.find_elements(By.CSS_SELECTOR, ".head-toggle")[1].click()
    assert 1 not in {h for h, _, _, _ in lines(browser)}
    # encoder-decoder: the cross attention has target rows and source columns
    Select(root.find_element(By.CSS_SELECTOR, "select.group-select")).select_by_visible_text(
        "cross")
    rows = [e.text for e in root.find_elements(By.CSS_SELECTOR, "text.tok-left")]
    cols = [e.text for e in root.find_elements(By.CSS_SELECTOR, "text.tok-right")]
    assert (rows, cols) == (["[BOS]", *TARGET.split("|")], NASTY)
    assert len(Select(root.find_element(By.CSS_SELECTOR, "select.layer-select")).options) == 3
    assert_nothing_ran(browser)
    shot = tmp_path / "head.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000


def test_model_view(browser, setup, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    model, tok = setup
    root = open_view(browser, viz.model_view(model, tok, TEXT, target=TARGET), tmp_path, "model")
    assert_nothing_ran(browser)
    assert len(root.find_elements(By.CSS_SELECTOR, "canvas.thumb")) == 2 * 4  # L x H encoder
    Select(root.find_element(By.CSS_SELECTOR, "select.group-select")).select_by_visible_text(
        "decoder")
    thumbs = root.find_elements(By.CSS_SELECTOR, "canvas.thumb")
    assert len(thumbs) == 3 * 4
    thumbs[4 * 2 + 3].click()  # layer 2, head 3: enlarged below
    detail = root.find_element(By.CSS_SELECTOR, ".detail")
    assert "layer 2, head 3" in detail.text
    assert {h for h, _, _, _ in lines(browser)} == {3}
    assert all(j <= i for _, i, j, _ in lines(browser))  # causal decoder attention
    assert browser.save_screenshot(str(tmp_path / "model.png"))


def test_neuron_view_scores_softmax_to_the_weights(browser, setup, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    model, tok = setup
    cap = viz.capture_text(model, tok, TEXT, target=TARGET)
    root = open_view(browser, viz.render(cap, "neuron"), tmp_path, "neuron")
    assert_nothing_ran(browser)
    Select(root.find_element(By.CSS_SELECTOR, "select.layer-select")).select_by_index(1)
    Select(root.find_element(By.CSS_SELECTOR, "select.head-select")).select_by_index(2)
    Select(root.find_element(By.CSS_SELECTOR, "select.query-select")).select_by_index(3)
    rows = root.find_elements(By.CSS_SELECTOR, "tr.key-row")
    assert [r.find_element(By.CSS_SELECTOR, "td.tokcell").text for r in rows] == NASTY
    scores = [float(r.find_element(By.CSS_SELECTOR, "td.score").text) for r in rows]
    z = sum(math.exp(s) for s in scores)
    expect = cap.group("encoder").weights[1][2, 3]
    for s, w in zip(scores, expect.tolist(), strict=True):
        assert math.exp(s) / z == pytest.approx(w, abs=2e-4)
    # decoder: keys after the query are masked
    Select(root.find_element(By.CSS_SELECTOR, "select.group-select")).select_by_visible_text(
        "decoder")
    Select(root.find_element(By.CSS_SELECTOR, "select.query-select")).select_by_index(1)
    scores = [r.text for r in root.find_elements(By.CSS_SELECTOR, "td.score")]
    assert scores[2:] == ["masked"] * (len(scores) - 2) and scores[1] != "masked"
    assert browser.save_screenshot(str(tmp_path / "neuron.png"))


def test_rollout_and_compare_views(browser, setup, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    model, tok = setup
    root = open_view(browser, viz.rollout_view(model, tok, TEXT, target=TARGET), tmp_path,
                     "rollout")
    assert_nothing_ran(browser)
    assert root.find_elements(By.CSS_SELECTOR, ".rollout canvas")
    assert root.find_elements(By.CSS_SELECTOR, ".flow canvas")
    entropy = root.find_element(By.CSS_SELECTOR, ".entropy table")
    assert len(entropy.find_elements(By.TAG_NAME, "tr")) == 1 + 2  # header + L layers
    root = open_view(browser, viz.compare_view(model, model, TEXT, tokenizer_a=tok,
                                               tokenizer_b=tok), tmp_path, "compare")
    assert_nothing_ran(browser)
    assert len(root.find_elements(By.CSS_SELECTOR, ".panel")) == 3  # A, B, difference
    diff = root.find_element(By.CSS_SELECTOR, ".panel.diff")
    assert len(diff.find_elements(By.CSS_SELECTOR, "canvas.thumb")) == 2 * 4
    assert "darkest = 0.000" in diff.text  # the same model twice
    Select(diff.find_element(By.CSS_SELECTOR, "select.diff-group-select")).select_by_visible_text(
        "decoder")
    assert len(diff.find_elements(By.CSS_SELECTOR, "canvas.thumb")) == 3 * 4
