"""The browser playground at `/`, driven in headless Chromium over the DevTools protocol (Playwright)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

import splitfuse
from splitfuse.testing.server import wait_idle
from splitfuse.serving.server import browser_url

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
KEY = "playground-key"
MODEL = "tiny-llama"
PROMPT = "Once upon a time"
ARTIFACTS = Path(os.environ.get("SPLITFUSE_TEST_ARTIFACTS") or Path(__file__).parents[1] / "artifacts")

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")


def _serve(model_dir: str, **kwargs):
    return splitfuse.serve(model_dir, backend="cpu", kv_block_size=16, num_kv_blocks=256,
                           served_model_name=MODEL, **kwargs)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    handle = _serve(tiny_model_dir("llama"))
    yield handle
    handle.terminate()


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir):
    handle = _serve(tiny_model_dir("llama"), api_key=KEY)
    yield handle
    handle.terminate()


@pytest.fixture
def paced(server, monkeypatch):
    """Adds 5 ms to each engine step, as a real model's would take, so a reply spans many network
    reads (and a Stop lands mid-stream) however fast or loaded this machine is."""
    engine = server.engine.engine
    step = engine.step

    def paced_step():
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(engine, "step", paced_step)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    # The system chromium: Playwright's own browser downloads are not used.
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=["--no-sandbox", "--disable-background-networking"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page (empty localStorage) that records every URL it requests."""
    context = browser.new_context(viewport={"width": 1000, "height": 720})
    tab = context.new_page()
    tab.requested = []
    tab.on("request", lambda request: tab.requested.append(request.url))
    yield tab
    context.close()


def _open(page, server, model: str | None = MODEL):
    page.goto(server.url + "/")
    if model is not None:
        page.wait_for_function("name => document.getElementById('model').textContent === name", arg=model)
    # Count the renders that showed part of a reply: text on screen while the request still runs.
    page.evaluate("""() => {
        window.partialRenders = 0;
        new MutationObserver(() => {
            const running = document.getElementById('status').textContent === '';
            if (running && document.getElementById('output').textContent) window.partialRenders += 1;
        }).observe(document.getElementById('output'), {childList: true, characterData: true, subtree: true});
    }""")


def _fill(page, prompt: str = PROMPT, **fields) -> None:
    page.fill("#prompt", prompt)
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def _output(page) -> str:
    return page.eval_on_selector("#output", "e => e.textContent")


def _wait_finished(page) -> str:
    page.wait_for_function("document.getElementById('status').textContent.startsWith('finished')", timeout=20_000)
    return page.text_content("#status")


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


# ---- served files ------------------------------------------------------------------------------
def test_page_and_static_files_need_no_key_while_v1_does(keyed_server):
    page = httpx.get(keyed_server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, kind in (("playground.js", "javascript"), ("playground.css", "text/css")):
        assert f"static/{name}" in page.text
        reply = httpx.get(f"{keyed_server.url}/static/{name}")
        assert reply.status_code == 200 and kind in reply.headers["content-type"]
    assert httpx.get(keyed_server.url + "/v1/models").status_code == 401
    assert httpx.get(keyed_server.url + "/static/missing.js").status_code == 404


def test_browser_url_turns_wildcard_binds_into_loopback():
    assert browser_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert browser_url("::", 8000) == "http://[::1]:8000"
    assert browser_url("10.1.2.3", 80) == "http://10.1.2.3:80"


# ---- in the browser ----------------------------------------------------------------------------
@needs_chromium
def test_completion_streams_into_the_page(page, server, paced):
    _open(page, server)
    _fill(page, max_tokens=64, temperature=0)
    page.click("#send")
    assert _wait_finished(page) == "finished: length"
    want = httpx.post(server.url + "/v1/completions", timeout=30, json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 64, "temperature": 0}).json()
    assert _output(page) == want["choices"][0]["text"] != ""
    assert page.evaluate("window.partialRenders") > 1  # appeared piece by piece, not at once
    assert page.text_content("#tokens") == "64"  # from the stream's usage chunk
    assert re.fullmatch(r"\d+(\.\d)?", page.text_content("#tps")) and float(page.text_content("#tps")) > 0
    assert re.fullmatch(r"\d+ ms", page.text_content("#ttft"))
    assert page.is_hidden("#error")
    # Offline: nothing but the server itself was requested (no CDN, no fonts).
    assert page.requested and all(url.startswith(server.url + "/") for url in page.requested)
    _screenshot(page, "playground-completion.png")


@needs_chromium
def test_chat_mode_streams_the_assistant_reply(page, server):
    _open(page, server)
    page.check("input[name=mode][value=chat]")
    _fill(page, prompt="Hello there", max_tokens=24, temperature=0, stop="")
    page.click("#send")
    _wait_finished(page)
    want = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 24,
        "temperature": 0}).json()
    assert _output(page) == want["choices"][0]["message"]["content"] != ""
    assert page.text_content("#tokens") == str(want["usage"]["completion_tokens"])


@needs_chromium
def test_stop_aborts_the_request_and_frees_its_kv_blocks(page, server, paced):
    wait_idle(server.url)
    steps = server.engine.stats.steps
    _open(page, server)
    _fill(page, max_tokens=480, temperature=0)
    page.click("#send")
    page.wait_for_function("document.getElementById('output').textContent.length > 0")
    page.click("#stop-button")
    page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
    assert page.is_enabled("#send") and page.is_disabled("#stop-button")
    stats = wait_idle(server.url)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert server.engine.stats.steps - steps < 400  # aborted long before its 480 tokens


@needs_chromium
def test_server_errors_are_shown_readably(page, server):
    _open(page, server)
    _fill(page, max_tokens=100_000)
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    limit = httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"]
    assert page.text_content("#error").startswith(f"400: this model's maximum context length is {limit} tokens")
    assert _output(page) == "" and page.is_enabled("#send")


@needs_chromium
def test_api_key_from_the_page_is_sent_and_remembered(page, keyed_server):
    _open(page, keyed_server, model=None)
    # the page asks for the key rather than opening with an error
    page.wait_for_function("document.getElementById('model').textContent === \"enter the server's API key\"")
    assert page.is_hidden("#error")
    assert page.evaluate("document.activeElement.id") == "api-key"
    _fill(page, max_tokens=8)
    page.click("#send")
    page.wait_for_function("document.getElementById('error').textContent.startsWith('401: ')")
    assert _output(page) == ""

    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("name => document.getElementById('model').textContent === name", arg=MODEL)
    assert page.is_hidden("#error")
    page.click("#send")
    _wait_finished(page)
    assert _output(page) and page.text_content("#tokens") == "8"

    page.reload()  # the key survives in localStorage
    page.wait_for_function("name => document.getElementById('model').textContent === name", arg=MODEL)
    assert page.input_value("#api-key") == KEY


@needs_chromium
def test_sampling_fields_default_to_the_models_own_values(page, server):
    defaults = httpx.get(server.url + "/v1/models").json()["data"][0]["sampling_defaults"]
    _open(page, server)
    for name in ("temperature", "top_p", "top_k"):
        value = defaults.get(name)
        shown = str(int(value)) if value is not None and float(value).is_integer() else str(value)  # as JS prints it
        want = f"{shown} (model)" if name in defaults else "server default"
        assert page.get_attribute(f"#{name}", "placeholder") == want
        assert page.input_value(f"#{name}") == ""
    sent = []
    page.on("request", lambda request: sent.append(request.post_data_json) if request.method == "POST" else None)
    _fill(page, max_tokens=4)
    page.click("#send")
    _wait_finished(page)
    # nothing typed, nothing sent: the server applies the model's generation_config.json
    assert sent and not {"temperature", "top_p", "top_k"} & set(sent[0])


@needs_chromium
def test_json_schema_box_constrains_the_reply(page, server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"]}
    _open(page, server)
    page.fill("#json_schema", json.dumps(schema))
    _fill(page, max_tokens=40, temperature=1.0)
    page.click("#send")
    assert _wait_finished(page) == "finished: stop"
    jsonschema.validate(json.loads(_output(page)), schema)


@needs_chromium
def test_json_schema_box_reports_bad_json_and_bad_schemas(page, server):
    _open(page, server)
    _fill(page, max_tokens=8)
    page.fill("#json_schema", "{not json")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error").startswith("JSON schema: not valid JSON")
    page.fill("#json_schema", '{"type": "objec"}')
    page.click("#send")
    page.wait_for_function("document.getElementById('error').textContent.startsWith('400: ')")
    assert "response_format: Unsupported type" in page.text_content("#error") and _output(page) == ""
