"""The web UI in a real browser: Debian's Chromium, headless, driven by Selenium through Debian's
chromedriver, against the real stack (tritonserver + gateway on the tiny model) from conftest.

Each test saves a screenshot of what the person would see under its temporary folder.
"""
from __future__ import annotations

import base64
import csv
import json
import time
import urllib.request
from pathlib import Path

import pytest

from shelfsight.ui import ask
from tests.conftest import running_gateway, shelfsight
from tests.imagefiles import encode, photo

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.slow
ASK = dict(seed="7", max_new_tokens="12", temperature="0.3")


def wait_for(what, timeout: float = 60, every: float = 0.1, message: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or what}")
        time.sleep(every)


class Page:
    """The workbench as a person uses it: by element ids the UI sets (ui/app.py)."""

    def __init__(self, driver, url: str, shots: Path, target: str = ""):
        self.d, self.url, self.shots, self.target = driver, url, shots, target
        self.d.get(url)
        wait_for(lambda: "Gateway" in self.text("gateway-status"), message="the gateway status line")

    def find(self, css: str):
        return self.d.find_element("css selector", css)

    def text(self, elem_id: str) -> str:
        return self.d.execute_script(f"const e = document.getElementById('{elem_id}'); return e ? e.innerText : ''")

    def value(self, elem_id: str) -> str:
        return self.find(f"#{elem_id} textarea, #{elem_id} input").get_attribute("value")

    def rows(self, elem_id: str) -> list[list[str]]:
        """A Dataframe's data rows, each a list of cell texts (Gradio draws a virtual grid, not a tbody)."""
        return self.d.execute_script(
            f"return [...document.querySelectorAll('#{elem_id} [role=row]')]"
            ".filter(r => r.getAttribute('aria-rowindex') !== '1')"
            ".map(r => [...r.querySelectorAll('[role=gridcell], td')].map(c => c.innerText.trim()))")

    def tab(self, name: str) -> None:
        next(b for b in self.d.find_elements("css selector", "button[role=tab]") if b.text == name).click()

    def upload(self, elem_id: str, *paths: Path) -> None:
        self.find(f"#{elem_id} input[type=file]").send_keys("\n".join(str(p) for p in paths))

    def fill(self, elem_id: str, value: str) -> None:
        box = self.find(f"#{elem_id} input[type=number], #{elem_id} textarea, #{elem_id} input")
        self.d.execute_script("arguments[0].value = ''", box)
        box.send_keys(value)
        box.send_keys("\t")  # Gradio takes a number box's value on blur

    def controls(self, seed: str, max_new_tokens: str, temperature: str) -> None:
        self.fill("seed", seed)
        self.fill("max-new-tokens", max_new_tokens)
        self.fill("temperature", temperature)

    def paste_png(self, png: bytes) -> None:
        """Put a PNG on the browser's clipboard and press the photo box's paste button."""
        self.d.execute_cdp_cmd("Browser.grantPermissions", {
            "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"], "origin": self.url.rstrip("/")})
        wrote = self.d.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
            navigator.clipboard.write([new ClipboardItem({'image/png': new Blob([bytes], {type: 'image/png'})})])
                .then(() => done('ok'), e => done(String(e)));""", base64.b64encode(png).decode())
        assert wrote == "ok", wrote
        self.find("#photo button[aria-label='Paste from clipboard']").click()

    def click(self, elem_id: str) -> None:
        self.find(f"#{elem_id}").click()

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.d.save_screenshot(str(path))
        return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "scripts/system-deps installs chromium and chromium-driver"
    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300",
                "--disable-gpu", "--no-first-run"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def ui(gateway, tmp_path_factory):
    from shelfsight.ui.cli import start_beside

    page = start_beside(f"127.0.0.1:{gateway.port}", workdir=tmp_path_factory.mktemp("ui-work"))
    page.target = f"127.0.0.1:{gateway.port}"
    try:
        yield page
    finally:
        page.close()


@pytest.fixture
def page(browser, ui, tmp_path):
    return Page(browser, ui.local_url, tmp_path, target=ui.target)


def exif_photo(path: Path, seed: int) -> Path:
    """A JPEG stored landscape (320x200) whose EXIF says: turn it 90 degrees (orientation 6)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    path.write_bytes(encode(photo(320, 200, seed=seed), "JPEG", quality=90, exif=exif.tobytes()))
    return path


def test_ask_streams_the_answer_that_the_cli_gives_then_hits_the_cache(page, tmp_path):
    img = exif_photo(tmp_path / "upright.jpg", seed=4711)
    assert "ready" in page.text("gateway-status")
    # offline: everything the page loaded came from the UI's own server (no CDN, fonts or analytics)
    loaded = page.d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(page.url.rstrip("/")) for u in loaded), loaded
    page.upload("photo", img)
    # shown as the model sees it: EXIF orientation applied, so portrait
    seen = wait_for(lambda: page.d.execute_script(
        "const i = document.querySelector('#seen img'); return i && i.naturalWidth ? [i.naturalWidth, i.naturalHeight] : null"),
        message="the photo as the model sees it")
    assert seen == [200, 320]
    page.controls(**ASK)
    # every text the answer box shows, recorded as it changes
    page.d.execute_script("""
        window.snaps = [];
        const box = document.querySelector('#answer-text textarea');
        setInterval(() => { const v = box.value; if (window.snaps[window.snaps.length - 1] !== v) window.snaps.push(v); }, 5);
    """)
    page.click("ask-button")
    wait_for(lambda: "cache" in page.text("meta") and "model" in page.text("meta"), message="the answer's details")
    page.shot("ask-answered")
    answer = page.value("answer-text")
    snaps = [s for s in page.d.execute_script("return window.snaps") if s]
    meta = page.text("meta")
    assert "miss" in meta and "time to first token" in meta and "tiny" in meta.lower(), meta
    # streamed: the box showed the answer growing, each state a prefix of the whole
    assert len(snaps) >= 2 and snaps[-1] == answer, snaps
    assert all(answer.startswith(s) for s in snaps), snaps

    cli = shelfsight("ask", str(img), page.value("question"), "--target", page.target, "--json", "--cache", "skip",
                     "--seed", ASK["seed"], "--max-new-tokens", ASK["max_new_tokens"],
                     "--temperature", ASK["temperature"], "--top-p", "0.85", "--repetition-penalty", "1.1")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["text"] == answer

    page.click("ask-button")
    wait_for(lambda: "exact" in page.text("meta"), message="a cache hit on the second ask")
    assert page.value("answer-text") == answer
    page.shot("ask-cache-hit")

    page.fill("question", "something else")
    page.tab("History")
    rows = wait_for(lambda: page.rows("history-table"), message="history rows")
    assert [r[-1] for r in rows] == ["exact", "miss"] and rows[0][1] == "upright.jpg", rows
    page.shot("history")
    page.click("history-export")
    link = wait_for(lambda: page.d.execute_script("const a = document.querySelector('#history-file a');"
                                                  "return a && a.href"), message="the JSONL export")
    with urllib.request.urlopen(link, timeout=10) as r:
        exported = [json.loads(line) for line in r.read().decode().splitlines()]
    assert [e["meta"]["cache_status"] for e in exported] == ["miss", "exact"]
    assert exported[0]["answer"] == answer and exported[0]["controls"]["seed"] == 7

    # reopening a row brings its question and answer back into Ask
    page.find("#history-table [role=row][aria-rowindex='3'] [role=gridcell]").click()
    wait_for(lambda: page.value("question") == "What brand is this product?", message="the reopened question")
    assert page.value("answer-text") == answer and "miss" in page.text("meta")
    assert page.find("button[role=tab][aria-selected=true]").text == "Ask"


def test_a_file_that_is_not_a_photo_is_named_and_the_page_keeps_working(page, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("shopping list: milk, eggs\n")
    page.upload("photo", bad)
    note = wait_for(lambda: "Error" in page.text("photo-note") and page.text("photo-note"),
                    message="the photo's error note")
    assert "this file cannot be used as a photo: image is not a supported format" in note and "Traceback" not in note
    page.click("ask-button")
    err = wait_for(lambda: "Error" in page.text("ask-error") and page.text("ask-error"), message="the ask error")
    assert "That cannot be asked" in err and "not a supported format" in err
    page.shot("bad-file")

    # then a preset question, and a photo pasted from the clipboard (a PNG, as a screenshot tool puts there)
    next(b for b in page.d.find_elements("css selector", "#preset label") if b.text == "Read the label").click()
    wait_for(lambda: page.value("question") == ask.PRESETS["Read the label"], message="the preset question")
    page.paste_png(encode(photo(120, 90, seed=4712), "PNG"))
    wait_for(lambda: page.d.execute_script("const i = document.querySelector('#seen img'); return i && i.naturalWidth")
             == 120, message="the pasted photo as the model sees it")
    assert not page.text("photo-note")
    page.controls(**ASK)
    page.click("ask-button")
    wait_for(lambda: "model" in page.text("meta") and not page.text("ask-error"), message="an answer after the error")


def test_a_batch_of_six_fills_the_table_and_downloads_as_csv(page, browser, tmp_path):
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"shelf-{i}.png")
        paths[-1].write_bytes(encode(photo(160, 160, seed=900 + i), "PNG"))
    page.controls(seed="3", max_new_tokens="8", temperature="0.3")
    page.tab("Batch")
    page.upload("batch-files", *paths)
    wait_for(lambda: len(page.d.find_elements("css selector", "#batch-files .file-preview tr, #batch-files tr")) >= 6,
             message="six files listed")
    page.d.execute_script("""
        window.progress = [];
        setInterval(() => { const p = document.querySelector('#batch-progress');
                            if (p) window.progress.push(Number(p.value)); }, 20);
    """)
    page.click("batch-button")
    wait_for(lambda: "6 of 6 answered" in page.text("batch-status"), timeout=120, message="six answers")
    rows = page.rows("batch-table")
    assert sorted(r[0] for r in rows) == sorted(p.name for p in paths) and all(r[1] for r in rows), rows
    page.shot("batch")
    seen = page.d.execute_script("return window.progress")
    assert seen and seen[-1] == 6 and min(seen) < 6, seen  # it filled while answers arrived

    for old in browser.downloads.glob("*.csv"):
        old.unlink()
    wait_for(lambda: page.find("#batch-csv").is_enabled(), message="the CSV button")
    page.click("batch-csv")
    got = wait_for(lambda: [p for p in browser.downloads.glob("*.csv")], message="the CSV download")
    with open(got[0], newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert sorted(r["image"] for r in table) == sorted(p.name for p in paths)
    assert all(r["text"] and r["cache_status"] for r in table)


def test_the_page_says_when_the_gateway_is_down_and_recovers(browser, triton, tmp_path):
    from shelfsight.serving.tritonserver import free_port
    from shelfsight.ui.cli import start_beside

    port = free_port()
    ui = start_beside(f"127.0.0.1:{port}", workdir=tmp_path / "work")
    try:
        page = Page(browser, ui.local_url, tmp_path)
        assert "down" in page.text("gateway-status")
        page.upload("photo", exif_photo(tmp_path / "p.jpg", seed=4713))
        page.controls(**ASK)
        page.click("ask-button")
        err = wait_for(lambda: "Error" in page.text("ask-error") and page.text("ask-error"),
                       message="the gateway-down error")
        assert "not answering right now (it cannot be reached)" in err and "Traceback" not in err
        page.shot("gateway-down")
        with running_gateway(triton.grpc_url, port=port):
            wait_for(lambda: "ready" in page.text("gateway-status"), timeout=30, message="the status to recover")
            page.click("ask-button")
            wait_for(lambda: "model" in page.text("meta") and not page.text("ask-error"), timeout=60,
                     message="an answer once the gateway is back")
            page.shot("gateway-back")
    finally:
        ui.close()


def test_evaluate_scores_a_dataset_shows_the_report_and_compares_two_runs(page, tmp_path):
    from shelfsight.evaluation.dataset import synthesize

    data = tmp_path / "dataset"
    n = synthesize(data, per_category=1, seed=5, scripts=("latin",))
    page.tab("Evaluate")
    page.fill("eval-dataset", str(tmp_path / "no-such-folder"))
    page.click("eval-button")
    err = wait_for(lambda: "Error" in page.text("eval-report") and page.text("eval-report"), message="the error")
    assert "no-such-folder is not a folder" in err

    page.fill("eval-dataset", str(data))
    page.fill("eval-tokens", "4")
    for run in (1, 2):
        page.click("eval-button")
        wait_for(lambda: f"done: {n} images" in page.text("eval-status") and page.value("run-b") and
                 (run == 1 or page.value("run-a")), timeout=180, message=f"evaluation run {run}")
    report = page.text("eval-report")
    assert "By category" in report and "By variant" in report and "max_new_tokens 4" in report, report
    page.click("compare-button")
    compared = wait_for(lambda: " vs " in page.text("compare") and page.text("compare"), message="the comparison")
    assert " vs " in compared and "B - A" in compared
    # the second run repeats the first's seeded questions: the same answers, so no difference
    assert "+0.0" in compared and "By category" in page.text("report-a") and "By category" in page.text("report-b")
    page.shot("evaluate")


def test_search_tab_finds_an_indexed_product_by_photo_and_words(page, tmp_path):
    from shelfsight.client import CatalogItem, ShelfsightClient

    with ShelfsightClient(page.target) as c:
        results = list(c.index([CatalogItem(f"ui-{i}", encode(photo(400, 320, seed=900 + i), "JPEG"),
                                            ["Acme coffee jar", "Borealis tea box", "Cirrus kettle"][i],
                                            {"brand": ["Acme", "Borealis", "Cirrus"][i]}) for i in range(3)]))
    assert [r.status for r in results] == ["indexed"] * 3
    img = tmp_path / "query.png"
    img.write_bytes(encode(photo(400, 320, seed=901), "PNG"))
    page.tab("Search")
    wait_for(lambda: "items, embedded by" in page.text("catalog-info"), message="the index line")
    page.upload("search-photo", img)
    page.fill("search-top-k", "2")
    page.click("search-button")
    rows = wait_for(lambda: page.rows("search-table"), message="search results")
    assert rows[0][1] == "ui-1" and len(rows) == 2, rows  # its own photo first
    assert wait_for(lambda: page.d.execute_script("return document.querySelectorAll('#search-gallery img').length"),
                    message="result thumbnails") == 2
    assert "hits" in page.text("search-meta")
    page.shot("search-by-photo")
    page.fill("search-filters", "brand=Cirrus")
    page.click("search-button")
    wait_for(lambda: [r[1] for r in page.rows("search-table")] == ["ui-2"], message="a filtered search")
    page.fill("search-filters", "brand")
    page.click("search-button")
    assert "is not KEY=VALUE" in wait_for(lambda: page.text("search-note"), message="a bad filter named")


def test_the_structured_preset_answers_as_the_product_schema_and_shows_its_fields(page, tmp_path):
    img = tmp_path / "jar.png"
    img.write_bytes(encode(photo(300, 300, seed=977), "PNG"))
    page.upload("photo", img)
    next(b for b in page.d.find_elements("css selector", "#preset label") if b.text == ask.STRUCTURED).click()
    wait_for(lambda: page.find("#structured input").is_selected(), message="the product schema switched on")
    page.controls(seed="11", max_new_tokens="256", temperature="1.0")
    page.click("ask-button")
    wait_for(lambda: "model" in page.text("meta"), timeout=120, message="the structured answer")
    fields = json.loads(page.value("answer-text"))
    assert set(fields) == {"category", "brand", "colour", "spec", "text"}, fields
    rows = wait_for(lambda: page.rows("answer-table"), message="the fields as a table")
    assert [r[0] for r in rows] == ["category", "brand", "colour", "spec", "text"], rows  # one row per field
    page.shot("structured")
