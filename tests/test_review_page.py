"""The review page clicked through in a real headless Chromium, driven by Selenium, against ``safeclip serve
--review STORE`` started from the command line (tiny random-weight model, loopback only).

The browser is the system's (``chromium`` and ``chromedriver``; ``eval "$(bash .ci/browser)"`` installs them and
sets ``$SAFECLIP_TEST_CHROMIUM`` / ``$SAFECLIP_TEST_CHROMEDRIVER``); Selenium is handed both paths, so Selenium
Manager never runs and nothing is downloaded. Without a browser the test is skipped, unless
``SAFECLIP_REQUIRE_BROWSER=1`` (CI), where it fails. The items are built by hand (known probabilities): nothing
here is a moderation result. Every wait is bounded; the browser and the server are always stopped.
"""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from safeclip.review import open_store  # noqa: E402
from test_server import _start_serve, _stop_serve  # noqa: E402
from test_server_review import fill  # noqa: E402

TOKEN = "page-token-93d1-\u00fc"  # not ASCII: sent as its UTF-8 bytes
REVIEWER = "carol (trust & safety)"  # a name with characters that would matter if it were parsed as HTML
WAIT_S = 10.0


def browser_paths() -> tuple[str, str]:
    """Chromium and its driver, from the environment (.ci/browser) or the PATH; skip (or fail, when required)."""
    chromium = os.environ.get("SAFECLIP_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("SAFECLIP_TEST_CHROMEDRIVER") or shutil.which("chromedriver")
    missing = [what for what, path in (("chromium", chromium), ("chromedriver", driver))
               if not path or not os.access(path, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if missing:
        why = f"no headless browser: {', '.join(missing)} not found (eval \"$(bash .ci/browser)\")"
        if os.environ.get("SAFECLIP_REQUIRE_BROWSER") == "1":
            pytest.fail(why + "; SAFECLIP_REQUIRE_BROWSER=1")
        pytest.skip(why)
    assert chromium and driver
    return chromium, driver


@pytest.fixture
def driver(monkeypatch):
    chromium, chromedriver = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # were Selenium Manager ever asked, it could not download
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run", "--window-size=1200,900"):
        options.add_argument(arg)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        d.set_page_load_timeout(WAIT_S)
        d.set_script_timeout(WAIT_S)
        yield d
    finally:
        d.quit()


@pytest.mark.slow  # a real server process (and a browser): CI runs it; -m 'not slow' skips it
def test_a_reviewer_clicks_through_the_queue_in_headless_chromium(driver, tiny_model, cache_dir, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    db = tmp_path / "review.db"
    with open_store(db, policy="default") as store:
        ids = fill(store)  # a block (nudity 0.93), a flag (violence 0.7), an allow without a thumbnail
    (tmp_path / "token").write_text(TOKEN + "\n")
    env = {**os.environ, "SAFECLIP_CACHE_DIR": str(cache_dir), "SAFECLIP_DEVICE": "cpu"}
    env.pop("SAFECLIP_SERVE_TOKEN", None)
    proc, port = _start_serve(["--model", tiny_model, "--policy", "default", "--token-file", str(tmp_path / "token"),
                              "--review", str(db)], env)
    try:
        wait = WebDriverWait(driver, WAIT_S)

        def el(css: str):
            return driver.find_element(By.CSS_SELECTOR, css)

        def showing(item_id: int) -> None:
            wait.until(lambda d: el("#itemid").text == f"item {item_id}" and el("#item").is_displayed())

        driver.get(f"http://127.0.0.1:{port}/review")
        wait.until(lambda d: el("#token").is_displayed())

        # A wrong token: the error is shown in its line, and the page asks again.
        el("#token").send_keys("not-the-token")
        el("#reviewer").send_keys(REVIEWER)
        el("#start").click()
        wait.until(lambda d: el("#error").is_displayed() and "401" in el("#error").text)
        assert "Unauthorized" in el("#error").text and el("#login").is_displayed()
        driver.get_log("browser")  # the 401 is logged there: what is logged from here on must be clean
        el("#token").clear()
        el("#token").send_keys(TOKEN)
        el("#start").click()

        # The first item: its decided action, each category's probability and thresholds, the reasons, the image.
        showing(ids[0])
        assert not el("#error").is_displayed()
        assert el("#action").text == "block" and el("#reasons").text == "nudity"
        rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                for tr in driver.find_elements(By.CSS_SELECTOR, "#categories tbody tr")]
        assert rows == [["nudity", "0.930", "0.500", "0.800", "block"],
                        ["violence", "0.120", "0.600", "0.900", "allow"]]
        assert el("#who").text == f"reviewing as {REVIEWER}"
        wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('#thumb img');"
            "return !!i && i.complete && i.naturalWidth === 60 && i.src.startsWith('blob:');"))

        # Skip (n, then the button, then n): each goes to the back of the queue, so the first comes round again.
        ActionChains(driver).send_keys("n").perform()
        showing(ids[1])
        el("#next").click()
        showing(ids[2])
        ActionChains(driver).send_keys("n").perform()
        showing(ids[0])

        el("#block").click()
        showing(ids[1])
        assert el("#action").text == "flag" and el("#reasons").text == "violence"
        ActionChains(driver).send_keys("a").perform()  # the keyboard shortcut for Allow

        showing(ids[2])
        assert el("#action").text == "allow" and el("#reasons").text == "none"
        assert el("#thumb").text == "no thumbnail"
        Select(el("#category")).select_by_value("violence")
        el("#note").send_keys("a kitchen knife <b>not</b> a weapon")
        el("#flag").click()

        wait.until(lambda d: el("#status").text == "queue empty")
        assert not el("#item").is_displayed() and not el("#error").is_displayed()
        problems = [e["message"] for e in driver.get_log("browser")
                    if e["level"] in ("SEVERE", "WARNING") and "favicon.ico" not in e["message"]]
        assert problems == []  # no CSP violation, no script error, no failed request
    finally:
        _stop_serve(proc)

    with open_store(db, policy="default") as store:
        got = [(v.item_id, v.reviewer, v.action, v.category, v.note) for i in ids for v in store.get(i).verdicts]
    assert got == [(ids[0], REVIEWER, "block", None, None), (ids[1], REVIEWER, "allow", None, None),
                   (ids[2], REVIEWER, "flag", "violence", "a kitchen knife <b>not</b> a weapon")]
