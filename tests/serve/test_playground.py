"""The playground page at `/` in headless Chromium, against a real `lorakit serve` process.

Debian's chromium (installed by `bash .ci/system-deps.sh`) is driven by Playwright; nothing is
downloaded. What the page shows is compared with the server's own answers to the same requests
made with httpx: greedy text for an adapter, for a blend set with the sliders and for the base
(all sliders at zero), the server's JSON error messages (401, 400), and a classifier's label
and scores.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve import test_server_limits
from serve.test_server_http import API_KEY, MAX_TOKENS, PROMPT, ServerProcess

httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT_SCRIPT = ROOT / "scripts" / "screenshot_playground.py"
STATIC = ROOT / "src" / "lorakit" / "serve" / "static"  # every file there is served
STREAM_TIMEOUT_MS = 120_000  # two busy cores
TOKENS = 12
BLEND = {"sql": 0.7, "polite": 0.5}
# URL path -> (file in STATIC, Content-Type)
PAGE_FILES = {
    "/": ("index.html", "text/html"),
    "/playground/playground.js": ("playground.js", "text/javascript"),
    "/playground/playground.css": ("playground.css", "text/css"),
}
ENDED = '#status:is([data-state="done"], [data-state="error"], [data-state="stopped"])'
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHOWN_SCORE_TOL = 5e-5  # the page shows scores with 4 decimals

# The tiny BERT classifier and its adapter, and the in-process server, of the limits tests.
classifier_folders = test_server_limits.classifier_folders
serving = test_server_limits.serving


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("Debian's chromium is not installed: run `bash .ci/system-deps.sh`")
    return found


@pytest.fixture(scope="module")
def server(served_folders: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A `lorakit serve` process with an API key and the two adapters sql and polite."""
    running = ServerProcess(served_folders, tmp_path_factory.mktemp("log") / "serve.log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=_chromium(), headless=True)
        yield launched
        launched.close()


@pytest.fixture()
def page(browser: Any, server: Any) -> Iterator[Any]:
    """A fresh tab (its own sessionStorage) on the playground page, connected with the key."""
    context = browser.new_context()
    opened = context.new_page()
    opened.set_default_timeout(STREAM_TIMEOUT_MS)
    opened.goto(server.url + "/")
    opened.locator("#api-key").fill(API_KEY)
    opened.locator("#connect").click()
    opened.locator("#workspace").wait_for(state="visible")
    yield opened
    context.close()


def _server_text(server: Any, **fields: Any) -> str:
    """The server's greedy answer, asked with httpx without streaming."""
    body = {"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, **fields}
    answer = server.http.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["choices"][0]["text"])


def _generate(page: Any) -> str:
    """Type the prompt and settings, press Generate, wait for the stream's end: the text shown."""
    page.locator("#prompt").fill(PROMPT)
    page.locator("#max-tokens").fill(str(TOKENS))
    page.locator("#temperature").fill("0")  # the page's default is 0.7
    page.locator("#generate").click()
    page.locator(ENDED).wait_for()
    assert page.locator("#status").get_attribute("data-state") == "done"
    assert page.locator("#error").is_hidden()
    return str(page.locator("#output").text_content())


def test_the_page_loads_without_a_key_and_the_api_still_needs_it(server: Any) -> None:
    for path, (name, media_type) in PAGE_FILES.items():
        answer = httpx.get(server.url + path, timeout=60)
        assert answer.status_code == 200, path
        assert answer.content == (STATIC / name).read_bytes()
        assert answer.headers["content-type"].startswith(media_type)
        assert "default-src 'self'" in answer.headers["content-security-policy"]
    assert httpx.head(server.url + "/", timeout=60).status_code == 200
    page = httpx.get(server.url + "/", timeout=60).text
    assert '<script src="/playground/playground.js"' in page
    assert {path.name for path in STATIC.iterdir()} == {name for name, _ in PAGE_FILES.values()}
    for path in ["/v1/models", "/health", "/playground/other.js", "/playground/"]:
        assert httpx.get(server.url + path, timeout=60).status_code == 401, path
    refused = httpx.post(server.url + "/", json={}, timeout=60)  # only GET and HEAD are open
    assert refused.status_code == 401


def test_a_wrong_key_shows_the_servers_401_message(browser: Any, server: Any) -> None:
    expected = httpx.get(
        server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=60
    ).json()["error"]["message"]
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(STREAM_TIMEOUT_MS)
        page.goto(server.url + "/")
        page.locator("#error").wait_for(state="visible")  # no key yet: 401 at once
        assert page.locator("#key-section").is_visible()
        page.locator("#api-key").fill("wrong")
        page.locator("#error").evaluate("element => { element.hidden = true; }")
        page.locator("#connect").click()
        page.locator("#error").wait_for(state="visible")
        assert page.locator("#error-status").text_content() == "401"
        assert page.locator("#error-message").text_content() == expected
        assert page.locator("#workspace").is_hidden()
        stored = page.evaluate("sessionStorage.getItem('lorakit-playground-api-key')")
        assert stored == "wrong"
    finally:
        context.close()


def test_an_adapter_and_a_blend_stream_the_servers_greedy_answers(page: Any, server: Any) -> None:
    assert page.locator("#model option").all_text_contents() == ["base", "polite", "sql"]
    sliders = page.locator("#sliders input[type=range]")
    assert [sliders.nth(i).get_attribute("data-adapter") for i in range(2)] == ["polite", "sql"]
    expected = {
        "sql": _server_text(server, model="sql"),
        "blend": _server_text(server, model="base", lorakit={"blend": BLEND}),
        "base": _server_text(server, model="base"),
    }
    assert len(set(expected.values())) == 3  # so each equality below tests the choice

    page.locator("#model").select_option("sql")
    assert _generate(page) == expected["sql"]
    assert page.locator("#status").text_content() == f"Done (length, {TOKENS} tokens)."

    page.locator("#mode-blend").check()
    for name, weight in BLEND.items():
        page.locator(f'input[data-adapter="{name}"]').fill(str(weight))
    assert page.locator("#blend-summary").text_content() == "polite × 0.5 + sql × 0.7"
    assert _generate(page) == expected["blend"]

    for name in BLEND:
        page.locator(f'input[data-adapter="{name}"]').fill("0")
    assert _generate(page) == expected["base"]


def test_stop_ends_the_stream_and_the_server_drops_it(page: Any, server: Any) -> None:
    tokens = server.metric("lorakit_generated_tokens_total")
    page.locator("#model").select_option("polite")
    page.locator("#prompt").fill(PROMPT)
    page.locator("#max-tokens").fill(str(MAX_TOKENS))
    page.locator("#generate").click()
    page.locator("#output:not(:empty)").wait_for()  # the answer streams
    page.locator("#stop").click()
    page.locator(ENDED).wait_for()
    assert page.locator("#status").get_attribute("data-state") == "stopped"
    assert page.locator("#generate").is_enabled() and page.locator("#stop").is_disabled()
    deadline = time.monotonic() + 120
    while server.metric("lorakit_running_requests") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("lorakit_running_requests") == 0
    assert server.metric("lorakit_generated_tokens_total") - tokens < MAX_TOKENS


def test_a_refused_request_shows_the_servers_message(page: Any, server: Any) -> None:
    too_many = MAX_TOKENS + 1
    body = {"model": "sql", "prompt": PROMPT, "max_tokens": too_many, "stream": True}
    answer = server.http.post("/v1/completions", json=body)
    assert answer.status_code == 400
    page.locator("#prompt").fill(PROMPT)
    page.locator("#max-tokens").fill(str(too_many))
    page.locator("#generate").click()
    page.locator(ENDED).wait_for()
    assert page.locator("#status").get_attribute("data-state") == "error"
    assert page.locator("#error-status").text_content() == "400"
    assert page.locator("#error-message").text_content() == answer.json()["error"]["message"]


def test_the_screenshot_script_saves_the_page_at_the_streams_end(
    server: Any, tmp_path: Path
) -> None:
    out = tmp_path / "playground.png"
    blend = [f"--blend={name}={weight}" for name, weight in BLEND.items()]
    command = [
        sys.executable, str(SCREENSHOT_SCRIPT), "--url", server.url, "--api-key", API_KEY,
        *blend, "--prompt", PROMPT, "--max-tokens", str(TOKENS), "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    shown = json.loads(result.stdout.splitlines()[-1])
    assert shown["state"] == "done"
    assert shown["text"] == _server_text(server, model="base", lorakit={"blend": BLEND})
    header = out.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", header[16:24])  # the IHDR chunk
    assert width == 1000 and height >= 720  # the script's viewport; the full page may be taller


def test_a_classifier_base_shows_label_and_scores(
    browser: Any, classifier_folders: tuple[Path, Path]
) -> None:
    from lorakit.serve import Engine

    base, adapter = classifier_folders
    engine = Engine.from_pretrained(base)
    engine.load_adapter("sentiment", adapter)
    text = "thank you very much"
    with serving(engine) as url:  # no API key: the page connects at once
        expected = httpx.post(
            url + "/v1/classifications", json={"model": "sentiment", "input": text}, timeout=60
        ).json()["data"][0]
        context = browser.new_context()
        try:
            page = context.new_page()
            page.set_default_timeout(STREAM_TIMEOUT_MS)
            page.goto(url + "/")
            page.locator("#classification-form").wait_for(state="visible")
            assert page.locator("#key-section").is_hidden()
            assert page.locator("#completion-form").is_hidden()
            assert page.locator("#mode-blend").is_disabled()  # the route takes one adapter
            assert "POST /v1/classifications" in page.locator("#classification-form").inner_text()
            page.locator("#model").select_option("sentiment")
            page.locator("#text").fill(text)
            page.locator("#classify").click()
            page.locator("#label:not(:empty)").wait_for()
            assert page.locator("#label").text_content() == expected["label"]
            rows = page.locator("#scores tbody tr").all()
            shown = {row.locator("td").nth(0).inner_text(): row for row in rows}
            assert set(shown) == set(expected["scores"])
            for label, score in expected["scores"].items():
                cell = shown[label].locator("td").nth(1).inner_text()
                assert float(cell) == pytest.approx(score, abs=SHOWN_SCORE_TOL)
        finally:
            context.close()
