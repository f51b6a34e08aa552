"""The playground page (GET /) in a real headless Chromium, driven by selenium, against a real uvicorn server
on a loopback port with tiny random models: the form streams the base and PAD answers side by side, a
refused request shows the API's error message, the panes stack on a phone-sized window, and the page asks
nothing of anyone but the server.

Skipped when chromium, chromedriver or selenium is missing (CI installs them: `.ci/run`). With
PADENGINE_SCREENSHOT=path the first test also saves a screenshot there. Run as a script against a running
server to make the README's picture with the real default model:

    .venv/bin/padengine serve &
    .venv/bin/python tests/test_playground.py http://127.0.0.1:8000 docs/playground.png
"""
import http.client
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Without the background-networking flags Chromium reaches out to Google's services at start.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
PROMPT = "write a short poem about the sea"
PREFS = [("be concise", "1.5"), ("answer in french", "0.5")]


def start_browser(width=1280, height=900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="padengine-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    resize(driver, width, height)
    return driver, profile


def resize(driver, width, height):
    """Make the page's viewport (not the window around it) width x height."""
    driver.set_window_size(width, height)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])


def open_page(driver, origin) -> str:
    """Load the page (forgetting earlier requests) and wait until it has read the model's name (or failed
    to): the page starts with the placeholder "model: …"."""
    from selenium.webdriver.support.ui import WebDriverWait
    requests_sent(driver)               # drop what came before, e.g. the browser's start-up tab (chrome://)
    driver.get(origin + "/")
    WebDriverWait(driver, 10).until(lambda d: d.find_element("id", "model").text not in ("", "model: …"))
    return driver.find_element("id", "model").text


def fill(driver, prompt, prefs, **knobs):
    """Type the prompt, one preference row per (text, weight) (adding rows with the button) and the knobs."""
    from selenium.webdriver.common.by import By
    find = driver.find_element
    find(By.ID, "prompt").clear()
    find(By.ID, "prompt").send_keys(prompt)
    while len(driver.find_elements(By.CSS_SELECTOR, ".pref")) < len(prefs):
        find(By.ID, "add-pref").click()
    for row, (text, weight) in zip(driver.find_elements(By.CSS_SELECTOR, ".pref"), prefs):
        for cls, value in ((".pref-text", text), (".pref-weight", weight)):
            row.find_element(By.CSS_SELECTOR, cls).clear()
            row.find_element(By.CSS_SELECTOR, cls).send_keys(value)
    for name, value in knobs.items():
        box = find(By.ID, name)
        if box.get_attribute("type") == "checkbox":
            if box.is_selected() != value:
                box.click()
        else:
            box.clear()
            box.send_keys(str(value))


def run_and_wait(driver, timeout=60) -> dict:
    """Click the button and wait until both panes are done or refused: {pane: (state, text, stats)}."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.execute_script("for (const p of document.querySelectorAll('.pane')) delete p.dataset.state;")
    driver.find_element(By.ID, "run").click()
    final = "return [...document.querySelectorAll('.pane')].every(p => ['done', 'error'].includes(p.dataset.state))"
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(final))
    return {p: tuple(driver.execute_script(
        "const p = document.getElementById(arguments[0]);"
        "return [p.dataset.state, p.querySelector('.out').textContent, p.querySelector('.stats').textContent];", p))
        for p in ("base", "pad")}


def requests_sent(driver) -> list[dict]:
    """Every request the page made since the last call (Chrome's performance log)."""
    out = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            out.append(msg["params"]["request"])
    return out


def assert_only_local(sent: list[dict], origin: str) -> None:
    # data: URLs (the page's empty favicon) never leave the browser
    outside = [r["url"] for r in sent if not (r["url"].startswith(origin + "/") or r["url"].startswith("data:"))]
    assert not outside, f"the page asked outside {origin}: {outside}"


def api(origin, body) -> tuple[int, dict]:
    host, port = origin.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


# ---- the tests ----

@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"no headless browser here: {', '.join(missing)} missing (apt-get install chromium "
                    "chromium-driver)")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    driver, profile = start_browser()
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def origin(llama, persrm):
    """A uvicorn server in a thread, on a loopback socket bound to port 0 (the kernel picks a free one)."""
    import uvicorn
    from padengine import Engine
    from padengine.serving.async_engine import AsyncEngine
    from padengine.serving.server import build_app
    engine = AsyncEngine(Engine(llama, persrm, block_size=4), max_queue=16)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(engine, "tiny"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)
    engine.shutdown()
    sock.close()


def test_page_streams_base_and_pad_side_by_side(browser, origin):
    assert open_page(browser, origin) == "model: tiny"
    fill(browser, PROMPT, PREFS + [("to be removed", "9")], pad_weight=1.0, pad_top_k=5, temperature=0,
         max_tokens=12, seed=7, preference_in_base=False)
    browser.find_elements("css selector", ".pref .remove")[-1].click()
    panes = run_and_wait(browser)
    if os.environ.get("PADENGINE_SCREENSHOT"):
        browser.save_screenshot(os.environ["PADENGINE_SCREENSHOT"])

    for state, text, stats in panes.values():
        assert state == "done" and text.strip(), panes
        assert "ms to first token" in stats and "tokens/s" in stats and "finished:" in stats, stats
    sent = requests_sent(browser)
    assert_only_local(sent, origin)
    paths = {r["url"].removeprefix(origin) for r in sent}
    assert {"/", "/playground/playground.css", "/playground/playground.js", "/v1/models",
            "/v1/chat/completions"} <= paths, paths

    # the two requests the page built, and the server's own (non-streamed) answers to them
    bodies = [json.loads(r["postData"]) for r in sent if r["url"].endswith("/v1/chat/completions")]
    base, = [b for b in bodies if "preference" not in b]
    pad, = [b for b in bodies if "preference" in b]
    assert pad["preference"] == [{"text": t, "weight": float(w)} for t, w in PREFS]
    assert (pad["pad_weight"], pad["pad_top_k"], pad["preference_in_base"]) == (1.0, 5, False)
    assert base["stream"] and pad["stream"] and base["stream_options"] == {"include_usage": True}
    assert (base["max_tokens"], base["temperature"], base["seed"], base["pad_top_k"]) == (12, 0, 7, 5)
    assert base["messages"] == pad["messages"] == [{"role": "user", "content": PROMPT}]
    for name, body in (("base", base), ("pad", pad)):
        status, reply = api(origin, {**body, "stream": False})
        assert status == 200 and panes[name][1] == reply["choices"][0]["message"]["content"]
        assert panes[name][2].startswith(f"{reply['usage']['completion_tokens']} tokens")

    # phone-sized: the panes stack; desktop: side by side
    top = "return ['base', 'pad'].map(id => document.getElementById(id).getBoundingClientRect().top)"
    assert browser.execute_script(top)[0] == browser.execute_script(top)[1]
    resize(browser, 390, 844)
    base_top, pad_top = browser.execute_script(top)
    assert pad_top > base_top
    resize(browser, 1280, 900)


def test_refused_request_shows_the_api_error(browser, origin):
    open_page(browser, origin)
    fill(browser, PROMPT, [("be concise", "")], pad_weight="heavy", temperature=0, max_tokens=8)
    panes = run_and_wait(browser)
    status, reply = api(origin, {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}],
                                 "preference": [{"text": "be concise"}], "pad_weight": "heavy"})
    assert status == 400 and reply["error"]["param"] == "pad_weight"
    assert panes["pad"][:2] == ("error", reply["error"]["message"])      # "pad_weight: must be a finite number…"
    assert panes["pad"][2] == "refused: HTTP 400"
    assert panes["base"][0] == "done"                                    # the base request had no pad_weight
    assert_only_local(requests_sent(browser), origin)


# ---- as a script: the README's screenshot, against a running server ----

if __name__ == "__main__":
    url, path = sys.argv[1], sys.argv[2]
    driver, profile = start_browser()
    try:
        open_page(driver, url)
        fill(driver, "Give me three tips for a good night's sleep.",
             [("Be extremely concise: one short sentence.", "2")],
             pad_weight=2, pad_top_k=10, temperature=0, max_tokens=96, seed="", preference_in_base=False)
        panes = run_and_wait(driver, timeout=300)
        bottom = driver.execute_script("return document.body.getBoundingClientRect().bottom")
        resize(driver, 1280, min(900, int(bottom) + 1))       # no empty band under the panes
        driver.save_screenshot(path)
        print(json.dumps(panes, indent=2))
        assert_only_local(requests_sent(driver), url)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
