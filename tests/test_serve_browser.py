"""The page at ``/`` in a real browser: headless Chromium driven by Selenium, on the demo model.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and a runtime built from the
current patches; skipped with the reason otherwise. Screenshots are saved in the test's tmp dir.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import time

import pytest

from serve_fakes import RunningServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _reason() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (it comes with the `test` extra)"
    if not CHROMIUM or not DRIVER:
        return "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    from dllm_cli.errors import RuntimeMissingError
    from dllm_cli.runtime.library import check

    try:
        check()
    except RuntimeMissingError as e:
        return f"no patched runtime: {e}"
    return None


pytestmark = pytest.mark.skipif(_reason() is not None, reason=str(_reason()))


@pytest.fixture(scope="module")
def server():
    from dllm_cli.runtime.options import RuntimeOptions
    from dllm_cli.serve import ModelBackend, ServerDefaults

    srv = RunningServer(lambda: ModelBackend(None, RuntimeOptions(), ServerDefaults()))
    yield srv
    srv.stop()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,800", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def ask(driver, question: str, *, mode: str, pace: str, tmp_path, shot: str) -> dict:
    """Send ``question``; poll the page while it draws; return what was seen and the finished answer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "mode")).select_by_value(mode)
    Select(driver.find_element(By.ID, "pace")).select_by_value(pace)
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    driver.find_element(By.ID, "prompt").send_keys(question)
    driver.find_element(By.ID, "send").click()
    seen = {"mask": False, "new": False, "edited": False}
    deadline = time.monotonic() + 60
    while True:
        answers = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        if len(answers) > before and "done" in answers[-1].get_attribute("class"):
            break
        for cls in seen:  # one script call per poll: cheap enough to catch 0.5 s steps
            if not seen[cls] and driver.execute_script(f"return !!document.querySelector('.row .{cls}')"):
                seen[cls] = True
                if cls == "new":
                    driver.save_screenshot(str(tmp_path / f"{shot}-drawing.png"))
        assert time.monotonic() < deadline, "the answer did not finish"
        time.sleep(0.05)
    driver.save_screenshot(str(tmp_path / f"{shot}.png"))
    last = answers[-1]
    return {"seen": seen, "text": last.find_element(By.CSS_SELECTOR, ".text").text,
            "stats": last.find_element(By.CSS_SELECTOR, ".stats").text}


def test_page_draws_the_answer_live_and_shows_stats(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    assert "same grammar as the terminal" in browser.find_element(By.ID, "legend").text
    deadline = time.monotonic() + 10
    while browser.find_element(By.ID, "model").text != "demo":
        assert time.monotonic() < deadline, "the page did not read /health"
        time.sleep(0.05)
    got = ask(browser, "What is 23 + 45?", mode="quality", pace="0", tmp_path=tmp_path, shot="sum")
    assert got["text"] == "68"
    assert "tok/fwd" in got["stats"] and "edit" in got["stats"] and "tok/s" in got["stats"]
    # slowed down (0.5 s per drawn step): masks and newly unmasked cells appear before the text is final
    got = ask(browser, "Describe the number 42.", mode="quality", pace="500", tmp_path=tmp_path, shot="number")
    assert re.fullmatch(r"(Well|So), 42 is an even number[.!] It is (a very|quite a) (nice|good) number[.!]", got["text"])
    assert got["seen"]["mask"] and got["seen"]["new"]
    assert got["stats"].startswith("quality · ")
    # speed mode on this question edits tokens with the shipped demo model: drawn as old→new
    got = ask(browser, "What do you think of France?", mode="speed", pace="500", tmp_path=tmp_path, shot="orange")
    assert "capital of France is Paris" in got["text"] and got["seen"]["edited"]
    assert " 0 edits" not in got["stats"] and got["stats"].startswith("speed · ")
    assert (tmp_path / "orange.png").stat().st_size > 1000
