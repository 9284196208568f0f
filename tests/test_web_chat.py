"""The chat page of `llmctl serve`, in a real browser: type a message, press Send, and the answer
streams in with a tokens/s figure; a second turn carries the conversation; Reset clears it; a
server with an API key asks for it and then answers.

Playwright drives the system Chromium (`apt-get install chromium`; `playwright install` is never
run); without either the test is skipped with the reason."""

from __future__ import annotations

import json
import re
import shutil

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no system Chromium (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("fastapi", reason='the serve extra is not installed (pip install "llmctl[serve]")')

from test_serve import KEY, build_checkpoints, serving  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare):
    return build_checkpoints(tmp_path_factory.mktemp("web"), shakespeare)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    # The page must work offline: any request to another origin fails the test.
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith("http://127.0.0.1:") else None)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    page.close()
    assert outside == [] and errors == []


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def test_a_message_streams_an_answer_with_tokens_per_second(runs, page, tmp_path):
    requests: list[dict] = []
    with serving(runs[1], tmp_path / "serve.log") as server:
        page.on("request", lambda r: requests.append(json.loads(r.post_data)) if r.method == "POST" else None)
        page.goto(server.url)
        sync_api.expect(page.locator("#model")).to_contain_text("chat · 512-token window")
        page.fill("#max-tokens", "40")
        send(page, "Say 3.")
        answer = page.locator(".msg.assistant .text").first
        sync_api.expect(answer).not_to_be_empty()
        sync_api.expect(page.locator(".msg.assistant .meta").first).to_have_text(
            re.compile(r"^\d+ tokens? · [\d.]+ tokens/s .* (done|stopped at max tokens)$"))
        assert re.search(r"[\d.]+ tokens/s", page.locator("#speed").inner_text())
        first = answer.inner_text()
        body = requests[-1]
        assert body["stream"] is True and body["max_tokens"] == 40 and body["messages"] == [
            {"role": "user", "content": "Say 3."}]
        # The second turn sends the whole conversation, the first answer included.
        send(page, "Say 4.")
        sync_api.expect(page.locator(".msg.assistant .meta")).to_have_count(2)
        sync_api.expect(page.locator(".msg.assistant .meta").nth(1)).to_contain_text("tokens/s")
        assert requests[-1]["messages"] == [{"role": "user", "content": "Say 3."},
                                            {"role": "assistant", "content": first},
                                            {"role": "user", "content": "Say 4."}]
        page.click("#reset")
        sync_api.expect(page.locator(".msg")).to_have_count(0)
        send(page, "Say 5.")
        sync_api.expect(page.locator(".msg.assistant .meta")).to_contain_text("tokens/s")
        assert requests[-1]["messages"] == [{"role": "user", "content": "Say 5."}]


def test_a_server_with_a_key_asks_for_it_then_answers(runs, page, tmp_path):
    with serving(runs[0], tmp_path / "serve.log", "--api-key", KEY) as server:
        page.goto(server.url)
        sync_api.expect(page.locator("#model")).to_contain_text("API key needed")
        send(page, "ROMEO:")
        sync_api.expect(page.locator(".notice.error")).to_contain_text("The server needs an API key")
        sync_api.expect(page.locator("#api-key")).to_be_visible()
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        sync_api.expect(page.locator("#model")).to_contain_text("no chat template")
        send(page, "ROMEO:")
        sync_api.expect(page.locator(".msg.assistant .meta")).to_contain_text("tokens/s")
