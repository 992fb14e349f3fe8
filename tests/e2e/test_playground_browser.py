"""The playground page in a real browser (Debian's headless Chromium, driven by its
chromedriver through Selenium) against the real stack on loopback: NGINX with a self-signed
certificate, the gateway, and vLLM (CPU build, tiny model). Nothing here downloads a browser.
"""

import contextlib
import os
import re
import shutil
import time

import pytest

from tests.e2e.engine_stack import SERVED_NAME
from tests.integration.nginx_stack import render, serving
from tests.integration.proxy_stack import engine as fake_engine_stack
from tests.integration.proxy_stack import gateway
from tests.servers import ROOT

# The README's picture of the page, retaken only when asked (PLAYGROUND_SCREENSHOT=1 make test),
# so that a test run leaves the working tree as it found it.
README_SCREENSHOT = ROOT / "results" / "playground.png"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-dev-shm-usage", "--ignore-certificate-errors", "--window-size=1100,1150",
)

# What the page has painted, frame by frame: the reply's length at every animation frame.
LONG_REPLY = 200
"""Characters of a reply long enough to need several frames to stream."""
RECORD_PAINTS = """
window.__paints = [];
const watch = () => {
  const replies = document.querySelectorAll('.message.assistant .text');
  const last = replies[replies.length - 1];
  window.__paints.push(last ? last.textContent.length : -1);
  window.__watching = requestAnimationFrame(watch);
};
watch();
"""

STOP_AT_FIRST_TEXT = """
window.__stoppedAt = null;
const observer = new MutationObserver(() => {
  const replies = document.querySelectorAll('.message.assistant .text');
  const last = replies[replies.length - 1];
  if (last && last.textContent.length > 0) {
    observer.disconnect();
    window.__stoppedAt = last.textContent.length;
    document.getElementById('stop').click();
  }
});
observer.observe(document.getElementById('chat'),
                 {subtree: true, childList: true, characterData: true});
"""


def program(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")
    assert path, f"{name} is missing: install Debian's chromium and chromium-driver (.ci/run)"
    return path


@pytest.fixture(scope="module")
def site(gw, tmp_path_factory):
    site = render(tmp_path_factory.mktemp("playground-site"), gw.url.removeprefix("http://"))
    with serving(site):
        yield site


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a browser online
    options = webdriver.ChromeOptions()
    options.binary_location = program("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(program("chromedriver")))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, check, timeout: float = 30.0, what: str = "condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: check(d), message=f"{what} not reached in {timeout}s")


def by_id(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def replies(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".message.assistant .text")]


def open_page(driver, site, key: str) -> None:
    driver.get(site.https + "/playground")
    driver.execute_script("sessionStorage.clear()")
    driver.refresh()
    by_id(driver, "api-key").send_keys(key)
    by_id(driver, "connect").click()


def set_max_tokens(driver, n: int) -> None:
    field = by_id(driver, "max-tokens")
    field.clear()
    field.send_keys(str(n))


def send(driver, text: str) -> None:
    by_id(driver, "prompt").send_keys(text)
    by_id(driver, "send").click()


def idle(driver) -> bool:
    return by_id(driver, "send").is_enabled() and not by_id(driver, "stop").is_enabled()


def error_text(driver) -> str:
    node = by_id(driver, "error")
    return node.text if node.is_displayed() else ""


def csp_violations(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")
            if "Content Security Policy" in entry["message"] or entry["level"] == "SEVERE"]


def test_chat_streams_token_by_token_and_stop_aborts_the_engine(browser, site, gw, vllm,
                                                                tmp_path):
    key = gw.key("playground")
    open_page(browser, site, key)
    wait(browser, lambda d: by_id(d, "model").is_enabled(), what="models loaded")
    assert by_id(browser, "model").get_attribute("value") == SERVED_NAME
    assert key not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('appliance-playground-key')") \
        == key

    # Long enough to span many frames even when the machine is busy. The tiny model samples its
    # end of text at random, now and then within a few words, and a fast engine on an idle
    # machine can finish before the page's next frame: either reply shows nothing of streaming,
    # so a new chat asks again (at most five times; a gateway that holds streams back never
    # shows a partial reply).
    for _ in range(5):
        by_id(browser, "clear").click()
        set_max_tokens(browser, 600)
        browser.execute_script(RECORD_PAINTS)
        send(browser, "Hello! Tell me a long story.")
        wait(browser, lambda d: replies(d) and idle(d), 120, "generation finished")
        paints = browser.execute_script(
            "cancelAnimationFrame(window.__watching); return window.__paints")
        final = len(replies(browser)[-1])
        partial = {n for n in paints if 0 < n < final}
        if final >= LONG_REPLY and partial:
            break
    assert final > 0 and partial, f"the reply arrived in one paint: {sorted(set(paints))}"
    print(f"reply of {final} characters painted in {len(partial) + 1} states over "
          f"{len(paints)} frames")
    assert by_id(browser, "ttft").text.endswith(" ms")
    tokens = by_id(browser, "tokens").text
    prompt, completion, total = map(int, re.fullmatch(
        r"(\d+) prompt \+ (\d+) completion = (\d+)", tokens).groups())
    assert prompt > 0 and 0 < completion <= 600 and prompt + completion == total
    assert error_text(browser) == ""
    screenshot = README_SCREENSHOT if os.environ.get("PLAYGROUND_SCREENSHOT") == "1" \
        else tmp_path / "playground.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0

    from selenium.common.exceptions import TimeoutException

    aborts = 'appliance_upstream_aborts_total{reason="client_disconnected"}'
    # The tiny model is fast and a busy machine delivers its stream in bursts, so a poll from
    # here can miss the moment; the page itself presses Stop when the first text is painted. A
    # reply the gateway had relayed whole before Stop took hold (the model ended it at random,
    # or it came in one burst) aborted nothing: a new chat asks again (at most three times).
    for _ in range(3):
        aborts_before = gw_metric(gw, aborts)
        by_id(browser, "clear").click()  # a new chat: an earlier reply may fill the context
        set_max_tokens(browser, 900)
        browser.execute_script(STOP_AT_FIRST_TEXT)
        send(browser, "Another one, please, as long as you can.")
        wait(browser, lambda d: browser.execute_script("return window.__stoppedAt") is not None
             and idle(d), 60, "stopped after the first tokens")
        stopped = "stopped" in browser.find_elements(
            "css selector", ".message.assistant")[-1].get_attribute("class")
        with contextlib.suppress(TimeoutException):
            wait(browser, lambda d, before=aborts_before: gw_metric(gw, aborts) > before, 5,
                 "the gateway aborting the engine request")
        if stopped and gw_metric(gw, aborts) > aborts_before:
            break
    assert stopped, "every reply ended before Stop took hold"
    assert gw_metric(gw, aborts) > aborts_before, "the gateway aborted no engine request"
    stopped_at = len(replies(browser)[-1])
    time.sleep(0.5)
    assert len(replies(browser)[-1]) == stopped_at
    wait(browser, lambda d: vllm.metric("vllm:num_requests_running") == 0, 10,
         "the engine dropping the request")
    assert not csp_violations(browser)


def test_a_bad_key_shows_the_openai_error(browser, site):
    open_page(browser, site, "sk-not-a-real-key")
    wait(browser, lambda d: error_text(d), 10, "an error")
    assert error_text(browser).startswith("401: ")
    assert "Check the key." in error_text(browser)
    assert not by_id(browser, "model").is_enabled()


def test_a_rate_limited_key_shows_the_retry_time(browser, site, gw):
    open_page(browser, site, gw.key("playground-rpm-1", "--rpm", "1"))
    wait(browser, lambda d: by_id(d, "model").is_enabled(), what="models loaded")
    send(browser, "Hi")
    wait(browser, lambda d: error_text(d), 10, "an error")
    text = error_text(browser)
    assert text.startswith("429: ") and "Retry in " in text, text
    assert replies(browser) == []


def test_the_key_never_reaches_a_log(site, gw):
    key = gw.key("playground")
    logs = [site.access_log, site.error_log, gw.log]
    assert all(key not in path.read_text(errors="ignore") for path in logs if path.exists())


def gw_metric(gw, series: str) -> float:
    import httpx

    for line in httpx.get(gw.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_loading_engine_shows_the_503_and_its_retry_time(browser, tmp_path):
    """An engine still loading its model (the fake one, told so) behind a real gateway and
    NGINX: the page says so instead of failing silently."""
    with (
        fake_engine_stack("--ready-after", "600") as engine,
        gateway(engine.url, tmp_path) as loading_gw,
    ):
        site = render(tmp_path / "site", loading_gw.url.removeprefix("http://"))
        with serving(site):
            open_page(browser, site, loading_gw.key("playground"))
            wait(browser, lambda d: error_text(d), 10, "an error")
    text = error_text(browser)
    assert text.startswith("503: ") and "Retry in 5 s." in text, text
