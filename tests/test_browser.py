"""The Gradio chat demo in a real browser, on a server with an API key: headless Debian Chromium driven by Playwright
opens /demo/, is asked for the key, is refused with a wrong one, logs in with the right one, sends a message and
sees the reply stream in; screenshots are kept in test-artifacts/. Without the key, Gradio's API and upload routes
answer 401. The run report is served at /report behind the same key (HTTP Basic) and linked from the demo. Deployed through the stage entry (``serve.stage.run`` with block=False), as ``raylm serve --no-block``
does."""
from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
from browser_fixtures import browser  # noqa: F401 - fixture
from report_fixtures import make_report_run
from serve_fixtures import deployed, tiny_chat_model  # noqa: F401 - fixture

from pipelines.report.stage import build_report

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.browser,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

MESSAGE = "Hello, who are you?"
API_KEY = "demo-key-6789"

# Records every length the last bot message takes, so the test can tell a streamed reply from one that
# arrived whole.
OBSERVE_BOT = """() => {
  window.__botLengths = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('[data-testid="bot"]');
    if (bots.length) window.__botLengths.push(bots[bots.length - 1].innerText.length);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def alnum(text: str) -> str:
    """Compare replies on letters and digits only: Gradio renders the reply as Markdown."""
    return re.sub(r"[^A-Za-z0-9]", "", text)


@pytest.fixture(scope="module")
def demo_app(ray_cluster, tiny_chat_model, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("serve-demo")
    key_file = tmp / "api-key"
    key_file.write_text(API_KEY)
    report = build_report(make_report_run(tmp / "report-run"))["report"]
    overrides = ["serve.max_new_tokens=48", f"serve.api_key_file={key_file}", f"serve.report={report}"]
    with deployed(tmp / "run", tiny_chat_model, overrides) as (info, ctx):
        yield info, ctx


def expected_reply(api: str) -> openai.types.chat.ChatCompletion:
    """What the demo must show: the same request (default system prompt, greedy) sent with the openai client."""
    from serve.ui import DEFAULT_SYSTEM_PROMPT

    client = openai.OpenAI(base_url=api, api_key=API_KEY, max_retries=0)
    return client.chat.completions.create(
        model="raylm", temperature=0, top_p=0.95, max_tokens=48,
        messages=[{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": MESSAGE}])


def test_stage_wrote_endpoint_file(demo_app):
    info, ctx = demo_app
    saved = json.loads((ctx.run_dir.root / "serve" / "endpoint.json").read_text())
    assert saved["api"] == info["api"] and saved["demo"] == info["demo"]


def test_demo_routes_need_the_key(demo_app):
    info, _ = demo_app
    demo = info["demo"]
    assert httpx.get(demo + "config").status_code == 401
    files = {"files": ("a.txt", b"x" * 10)}
    assert httpx.post(demo + "gradio_api/upload", files=files).status_code == 401
    with httpx.Client() as http:  # logged in: the upload route stays bounded (the chat takes no files)
        assert http.post(demo + "login", data={"username": "u", "password": "wrong"}).status_code == 400
        assert http.post(demo + "login", data={"username": "u", "password": API_KEY}).status_code == 200
        assert http.get(demo + "config").status_code == 200
        big = http.post(demo + "gradio_api/upload", files={"files": ("big.bin", b"x" * 200_000)})
        assert big.status_code == 413, big.text[:300]


def log_in(page, password: str) -> None:
    page.locator("input[type=password]").wait_for(timeout=60_000)
    page.get_by_role("textbox").first.fill("someone")
    page.locator("input[type=password]").fill(password)
    page.get_by_role("button", name="Login").click()


def test_demo_asks_for_the_key_then_streams_a_reply_in_chromium(demo_app, browser, artifacts_dir):  # noqa: F811
    info, _ = demo_app
    expected = expected_reply(info["api"])
    assert expected.usage.completion_tokens >= 8, "the fixture model's greedy reply is too short to see streaming"

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(info["demo"], wait_until="load")  # never networkidle: Gradio keeps a heartbeat open
    log_in(page, "not-the-key")
    page.get_by_text("Incorrect Credentials").wait_for(timeout=30_000)
    page.screenshot(path=str(artifacts_dir / "serve-demo-login-refused.png"), full_page=True)
    log_in(page, API_KEY)
    box = page.get_by_role("textbox").first
    page.get_by_text("raylm chat").first.wait_for(timeout=60_000)
    assert page.get_by_role("link", name="Run report").get_attribute("href") == "/report"
    page.evaluate(OBSERVE_BOT)
    box.fill(MESSAGE)
    box.press("Enter")

    # The demo samples (temperature 0.8 by default), so its text is not the API's greedy reply: wait for a
    # reply that has stopped growing. (Setting the temperature slider from the test did not stick reliably.)
    deadline = time.monotonic() + 60
    shown, last_change = "", time.monotonic()
    while time.monotonic() < deadline:
        bots = page.locator('[data-testid="bot"]')
        now = alnum(bots.last.inner_text()) if bots.count() else ""
        if now != shown:
            shown, last_change = now, time.monotonic()
        elif shown and time.monotonic() - last_change > 3:
            break
        page.wait_for_timeout(200)  # polling under the deadline above
    page.screenshot(path=str(artifacts_dir / "serve-demo-chat.png"), full_page=True)
    assert shown, "the demo showed no reply"
    assert "error" not in shown.lower()[:20], shown
    lengths = page.evaluate("window.__botLengths")
    assert len({n for n in lengths if n > 0}) >= 2, f"the reply did not stream: lengths seen {lengths}"
    page.close()


def test_report_is_served_behind_the_key_and_renders_sandboxed(demo_app, browser, artifacts_dir):  # noqa: F811
    info, _ = demo_app
    url = info["report"]
    refused = httpx.get(url)
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(url, auth=("anyone", "wrong")).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    ok = httpx.get(url, auth=("anyone", API_KEY))
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/html")
    assert ok.headers["content-security-policy"].startswith("sandbox allow-scripts")
    # a browser asks for the key (HTTP Basic); the page's scripts run in the sandbox and still draw every plot
    context = browser.new_context(http_credentials={"username": "anyone", "password": API_KEY})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # generous bound: 5 MB of page and 8 plots took ~18 s to load on 2 busy cores
    page.goto(url, wait_until="load", timeout=120_000)
    assert page.locator(".js-plotly-plot").count() == 8 and not errors, errors
    page.screenshot(path=str(artifacts_dir / "serve-report.png"))
    context.close()
