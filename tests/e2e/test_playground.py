"""The playground page at / in a real headless Chromium (Debian's, driven by Playwright): chat streams a
reply from the real server, reasoning shows apart from the answer, a stopped reply stops costing compute,
an API key is asked for, and in whisper mode a file upload and a microphone recording are transcribed.
Screenshots land in test-artifacts/."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.helpers.server_process import ROOT, running_server
from tests.helpers.synthetic_speech import SENTENCES, espeak_available, spoken_clip

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# the flags keep Chromium off the network it cannot reach here; the fake devices stand in for a microphone
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
ARTIFACTS = Path(os.environ.get("BATCHWISE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
REPLY_SECONDS = 120


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        pytest.skip("no Chromium at /usr/bin/chromium (apt-get install chromium); .ci/run installs it")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser) -> Iterator:
    pages = []

    def open_at(url: str) -> Page:
        context = browser.new_context(permissions=["microphone"])
        page = context.new_page()
        pages.append(page)
        page.goto(url)
        return page

    yield open_at
    for page in pages:
        page.context.close()


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"playground-{name}.png", full_page=True)


def ask(page: Page, text: str, temperature: float = 0, max_tokens: int = 24, seed: int | None = None) -> None:
    page.fill("#temperature", str(temperature))
    page.fill("#seed", "" if seed is None else str(seed))
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_reply(page: Page):
    return page.locator("li.message.assistant").last


def collapsed(text: str) -> str:
    return " ".join(text.split())


def test_api_clients_keep_json_at_the_root_and_browsers_get_the_page(base_url):
    assert httpx.get(base_url).json()["serving_type"] == "chat"
    page = httpx.get(base_url, headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.headers["content-type"].startswith("text/html") and "Batchwise playground" in page.text
    script = httpx.get(f"{base_url}/playground/chat.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]


def test_chat_streams_the_reply_the_api_gives(open_page, base_url, client):
    question = "What is the capital of France?"
    expected = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=24,
                                              messages=[{"role": "user", "content": question}])
    page = open_page(base_url)
    expect(page.locator("#model")).to_contain_text("chat")
    ask(page, question)
    reply = last_reply(page)
    finish_reason = expected.choices[0].finish_reason
    expect(reply).to_have_attribute("data-finish-reason", finish_reason, timeout=REPLY_SECONDS * 1000)
    assert collapsed(reply.locator(".content").inner_text()) == collapsed(expected.choices[0].message.content)
    expect(reply.locator(".stats")).to_contain_text(f"{expected.usage.completion_tokens} tokens")
    expect(reply.locator(".reasoning")).to_be_hidden()
    screenshot(page, "chat")

    ask(page, "And of Italy?")  # the conversation goes on: the second turn sees the first
    expect(page.locator("li.message.assistant")).to_have_count(2)
    expect(last_reply(page)).to_have_attribute("data-finish-reason", re.compile("stop|length"),
                                               timeout=REPLY_SECONDS * 1000)


def test_stopping_a_reply_frees_the_server(open_page, base_url):
    page = open_page(base_url)
    ask(page, "Write a very long story about a dragon.", temperature=1, max_tokens=2000)
    expect(last_reply(page).locator(".content")).not_to_be_empty(timeout=REPLY_SECONDS * 1000)
    page.fill("#prompt", "And another one.")
    page.press("#prompt", "Enter")  # one reply at a time: this waits in the box
    expect(page.locator("li.message")).to_have_count(2)
    page.click("#stop-reply")
    expect(page.locator("#send")).to_be_enabled()
    deadline = time.monotonic() + 10
    while httpx.get(f"{base_url}/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{base_url}/health").json()["running"] == 0
    expect(page.locator("#error")).to_be_hidden()


def test_markdown_is_rendered_and_html_is_never_injected(open_page, base_url):
    page = open_page(base_url)
    html = page.evaluate("""async () => (await import('/playground/markdown.js')).renderMarkdown(
        "# Title\\n**bold** and *it* <img src=x onerror=alert(1)>\\n- `a*b*` item\\n- [link](https://example.org)"
        + "\\n\\n```\\n<b>code</b>\\n```")""")
    assert html == ('<h1>Title</h1><p><strong>bold</strong> and <em>it</em> &lt;img src=x onerror=alert(1)&gt;</p>'
                    '<ul><li><code>a*b*</code> item</li><li><a href="https://example.org" target="_blank" '
                    'rel="noopener noreferrer">link</a></li></ul><pre><code>&lt;b&gt;code&lt;/b&gt;</code></pre>')


def test_reasoning_is_shown_apart_from_the_answer(open_page, thinking_model):
    folder, _ = thinking_model
    with running_server("--hf-model", str(folder), "--served-model-name", "thinker") as url:
        expected = openai.OpenAI(base_url=f"{url}/v1", api_key="-").chat.completions.create(
            model="thinker", messages=[{"role": "user", "content": "What is 1+1?"}], temperature=1, seed=7,
            max_tokens=12)
        reasoning = expected.choices[0].message.reasoning_content
        assert reasoning.strip()
        page = open_page(url)
        ask(page, "What is 1+1?", temperature=1, seed=7, max_tokens=12)
        reply = last_reply(page)
        expect(reply).to_have_attribute("data-finish-reason", "length", timeout=REPLY_SECONDS * 1000)
        expect(reply.locator(".reasoning")).to_be_visible()
        assert collapsed(reply.locator(".reasoning .text").inner_text()) == collapsed(reasoning)
        assert collapsed(reply.locator(".content").inner_text()) == collapsed(expected.choices[0].message.content)
        screenshot(page, "reasoning")


def test_the_page_asks_for_the_api_key(open_page):
    with running_server("--api-key", "sesame") as url:
        page = open_page(url)
        expect(page.locator("#key-form")).to_be_visible()
        expect(page.locator("#key-message")).to_have_text("This server needs an API key")
        page.fill("#api-key", "wrong")
        page.click("#key-form button")
        expect(page.locator("#key-message")).to_have_text("That key was refused")
        page.fill("#api-key", "sesame")
        page.click("#key-form button")
        expect(page.locator("#chat")).to_be_visible()
        expect(page.locator("#key-form")).to_be_hidden()
        ask(page, "Say hello.", max_tokens=8)
        expect(last_reply(page)).to_have_attribute("data-finish-reason", re.compile("stop|length"),
                                                   timeout=REPLY_SECONDS * 1000)


def test_speech_page_transcribes_an_upload_and_a_recording(open_page, tmp_path):
    if not espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); it synthesises the test speech")
    clip = tmp_path / "fox.wav"
    clip.write_bytes(spoken_clip(SENTENCES[:1], pause_seconds=0.5))
    with running_server("--serving-type", "whisper") as url:
        page = open_page(url)
        expect(page.locator("#speech")).to_be_visible()
        page.set_input_files("#audio-file", str(clip))
        expect(page.locator("#speech-status")).to_have_attribute("data-done", "true", timeout=REPLY_SECONDS * 1000)
        assert "brown fox" in page.locator("#transcript").inner_text().lower()
        expect(page.locator("#segments tbody tr")).not_to_have_count(0)
        screenshot(page, "speech")

        page.click("#record")
        expect(page.locator("#record")).to_have_text("Stop recording")
        page.wait_for_timeout(2000)
        page.click("#record")
        expect(page.locator("#speech-status")).to_contain_text("recording.webm", timeout=10_000)
        expect(page.locator("#speech-status")).to_have_attribute("data-done", "true", timeout=REPLY_SECONDS * 1000)
        seconds = float(re.search(r"([\d.]+) s of audio", page.locator("#speech-status").inner_text()).group(1))
        assert 1.0 <= seconds <= 4.0
        expect(page.locator("#error")).to_be_hidden()
