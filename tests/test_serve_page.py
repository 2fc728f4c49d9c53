"""The chat page `infer serve` answers at /, driven in a real headless browser (Debian's chromium,
through playwright): the model's name, a system prompt, a streamed answer with its statistics,
and the stop button cutting a long answer short, on a real server with the SmolLM2 test model.

The set-up installs what it needs: the `chromium` package through apt when /usr/bin/chromium is
missing (as root, where apt is there; else the test is skipped), and `playwright` from PyPI when
it cannot be imported. Playwright's own browser download is never used."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
SYSTEM = "You are a friendly assistant. Answer in one short sentence."
# The command line, whether or not `serve` is in infer's command table yet (as tests/test_serve.py).
_LAUNCH = ("import sys\n"
           "from infer_cli.cli import app as a, serve\n"
           "if not any(c.name == 'serve' for c in a.app.registered_commands):\n"
           "    serve.register(a.app)\n"
           "a.main(sys.argv[1:])\n")


# --- what the test needs on the machine ---------------------------------------------------------

def _ensure_chromium() -> None:
    if os.path.exists(CHROMIUM):
        return
    apt = shutil.which("apt-get")
    if not apt or os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} is missing and cannot be installed here "
                    f"({'not root' if apt else 'no apt-get'}): apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "--no-install-recommends", "chromium"]
    r = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:  # a clean machine may have no package lists yet
        subprocess.run([apt, "update"], capture_output=True, text=True, env=env, timeout=300)
        r = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0 or not os.path.exists(CHROMIUM):
        pytest.fail(f"apt-get install chromium failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def _ensure_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "playwright"],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            pytest.fail(f"pip install playwright failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        import importlib
        importlib.invalidate_caches()
        from playwright.sync_api import sync_playwright
    return sync_playwright


# --- the server ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _running(base: str) -> float:
    m = re.search(r"^infer_sequences_running ([0-9.e+-]+)$", _get(base + "/metrics")[1], re.M)
    assert m, "no infer_sequences_running in /metrics"
    return float(m.group(1))


@pytest.fixture
def served(smollm2_gguf, tmp_path):
    port = _free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "INFER_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf")}
    env.pop("INFER_API_KEY", None)
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, "serve", str(smollm2_gguf),
                                 "--port", str(port), "--ctx", "2048", "--threads", "2",
                                 "--parallel", "1", "--temp", "0", "--max-tokens", "24"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
    base = f"http://127.0.0.1:{port}"
    stderr = lambda: log.read_text(errors="replace")  # noqa: E731
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"infer serve exited {proc.returncode}:\n{stderr()}")
            try:
                if _get(base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"infer serve did not get ready:\n{stderr()}")
            time.sleep(0.3)
        yield base, stderr
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def page(tmp_path):
    _ensure_chromium()
    sync_playwright = _ensure_playwright()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page()
            pg.set_default_timeout(30_000)
            pg.js_errors = []
            pg.on("pageerror", lambda e: pg.js_errors.append(str(e)))
            yield pg
        finally:
            browser.close()


# --- the test -----------------------------------------------------------------------------------

def _text_len(page, i: int) -> int:
    return page.locator(".msg.assistant .text").nth(i).evaluate("e => e.textContent.length")


def test_chat_page_streams_shows_stats_and_stops(served, page, tmp_path):
    base, server_log = served
    sent = []  # the bodies the page posts to /v1/chat/completions
    page.on("request", lambda r: sent.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") and r.method == "POST" else None)
    try:
        _drive(page, base, sent)
    except BaseException:
        page.screenshot(path=str(tmp_path / "chat-page.png"), full_page=True)
        (tmp_path / "chat-page.html").write_text(page.content())
        print(f"screenshot: {tmp_path / 'chat-page.png'}\nserver log:\n{server_log()[-4000:]}")
        raise


def _drive(page, base: str, sent: list) -> None:
    from playwright.sync_api import expect

    page.goto(base + "/")
    expect(page.locator("#model")).to_contain_text(MODEL_ID, timeout=15_000)
    expect(page.locator("#model")).to_contain_text("2048 tokens of context")
    send, stop = page.locator("#send"), page.locator("#stop")
    expect(send).to_be_enabled()
    expect(stop).to_be_disabled()

    # A system prompt, then a short question sent with the button.
    page.locator("details summary").click()
    page.locator("#system").fill(SYSTEM)
    page.locator("#input").fill("Say hello.")
    send.click()
    expect(page.locator(".msg.user")).to_have_text(["Say hello."])
    answer = page.locator(".msg.assistant").nth(0)
    expect(answer.locator(".text")).not_to_have_text("", timeout=60_000)
    expect(answer.locator(".stats")).to_have_text(
        re.compile(r"^\d+ prompt tokens (\(\d+ cached\) )?· [1-9]\d* generated · .*tokens/s.* · \d+\.\d\d s"),
        timeout=60_000)
    expect(answer.locator(".error")).to_have_count(0)
    expect(send).to_be_enabled()
    expect(stop).to_be_disabled()
    expect(page.locator("#input")).to_have_value("")
    assert sent and sent[0]["stream"] is True
    assert sent[0]["messages"] == [{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": "Say hello."}]
    first = answer.locator(".text").text_content()
    assert first.strip()

    # A long answer, sent with Enter, cut short with the stop button. Answers are kept short by
    # the server's --max-tokens (the page sends none), and the model may end one whenever it
    # likes, so the long requests ask for more tokens and for the end token to be ignored: that
    # changes when the answer would end, nothing of what the page does.
    def long_answer(route):
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "max_tokens": 1500, "ignore_eos": True}))

    page.route("**/v1/chat/completions", long_answer)
    page.locator("#input").fill("Write a very long story about a dragon and a knight.")
    page.locator("#input").press("Enter")
    expect(stop).to_be_enabled()
    expect(send).to_be_disabled()
    text = page.locator(".msg.assistant .text").nth(1)
    expect(text).not_to_have_text("", timeout=60_000)
    grown = _text_len(page, 1)
    deadline = time.monotonic() + 20
    while _text_len(page, 1) <= grown:  # streamed: the text grows while the answer runs
        assert time.monotonic() < deadline, "the answer's text did not grow"
        time.sleep(0.1)
    stop.click()
    stats = page.locator(".msg.assistant").nth(1).locator(".stats")
    expect(stats).to_have_text(re.compile(r"^stopped · \d+\.\d\d s$"), timeout=5_000)
    expect(send).to_be_enabled()
    expect(stop).to_be_disabled()
    expect(page.locator("#input")).to_be_focused()
    at_stop = _text_len(page, 1)
    time.sleep(2)
    assert _text_len(page, 1) == at_stop, "text kept arriving after stop"
    assert at_stop > 0
    assert sent[-1]["messages"][0] == {"role": "system", "content": SYSTEM}
    assert [m["role"] for m in sent[-1]["messages"]] == ["system", "user", "assistant", "user"]
    assert sent[-1]["messages"][2]["content"] == first
    # and the server let go of the sequence: the abort reached it
    deadline = time.monotonic() + 10
    while _running(base) != 0:
        assert time.monotonic() < deadline, "the server kept generating after stop"
        time.sleep(0.2)

    # "New chat" while an answer streams: it stops, and nothing of it leaks into the new chat.
    page.locator("#input").fill("Tell me another very long story.")
    send.click()
    expect(page.locator(".msg.assistant .text").nth(2)).not_to_have_text("", timeout=60_000)
    page.locator("#clear").click()
    expect(page.locator(".msg")).to_have_count(0)
    expect(send).to_be_enabled()
    page.unroute("**/v1/chat/completions")
    page.locator("#input").fill("Say hello.")
    send.click()
    expect(page.locator(".msg.assistant .stats")).to_have_text(
        re.compile(r"prompt tokens (\(\d+ cached\) )?· [1-9]\d* generated"), timeout=60_000)
    assert sent[-1]["messages"] == [{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": "Say hello."}]
    assert page.locator(".msg.assistant .text").text_content() == first  # temperature 0
    assert page.js_errors == []
