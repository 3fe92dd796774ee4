"""The workbench in a real headless Chromium (Debian's `chromium` + `chromium-driver`, which `make setup`
installs when missing): each page loads and shows what a person would read, curves are drawn on their
canvases, sorting, filtering, compare and chat work by clicking, and every page is saved as a screenshot
(into $PICOCHAT_SCREENSHOTS when set: docs/web/ is made that way)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from picochat_jax.web.app import WebSettings, create_web_app
from tests.test_serve import _serving

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromedriver are not installed "
                                                                   "(make setup installs them)")]


@pytest.fixture(scope="module")
def site(web_roots):
    runs, packs = web_roots
    yield from _serving(create_web_app(WebSettings(runs_root=runs, packs_root=packs)))


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1800", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("PICOCHAT_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait(driver, predicate, timeout: float = 60):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: predicate(d))


def _shot(driver, shots: Path, name: str) -> None:
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(shots / f"{name}.png"))
    assert (shots / f"{name}.png").stat().st_size > 5000


def _visible_names(driver) -> list[str]:
    return [row.find_element(By.CSS_SELECTOR, "td a").text for row in driver.find_elements(By.CSS_SELECTOR,
                                                                                           "#runs tbody tr")]


def test_runs_page_lists_runs_and_sorts_by_clicking(site, browser, shots):
    browser.get(site + "/")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Runs"
    assert sorted(_visible_names(browser)) == ["alpha", "beta"]
    header = browser.find_element(By.XPATH, "//th/button[text()='base loss']")
    header.click()
    assert _visible_names(browser) == ["alpha", "beta"]  # beta's base loss is 0.25 higher
    header.click()
    assert _visible_names(browser) == ["beta", "alpha"] and header.get_attribute("aria-sort") == "descending"
    assert browser.find_elements(By.CSS_SELECTOR, "#runs .badge-finished")
    verdict = httpx.get(site + "/api/runs").json()[0]["verdict"]
    assert verdict and len(browser.find_elements(By.CSS_SELECTOR, f"#runs .badge-{verdict}")) == 2
    _shot(browser, shots, "runs")


def test_run_page_draws_curves_and_filters_the_scoreboard(site, browser, shots):
    browser.get(site + "/runs/alpha")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Run alpha"
    canvases = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#charts canvas"))
    drawn = {c.get_attribute("aria-label").split(":")[0]: int(c.get_attribute("data-points") or 0) for c in canvases}
    curves = httpx.get(site + "/api/runs/alpha/metrics").json()["curves"]
    points = {key: sum(isinstance(r.get(key), float) for rows in curves.values() for r in rows)
              for key in ("loss", "val_loss", "lr")}
    assert drawn["loss"] == points["loss"] + points["val_loss"] > 4, (drawn, points)
    assert drawn["learning rate"] == points["lr"] > 4
    rows = browser.find_elements(By.CSS_SELECTOR, "#eval tbody tr")
    Select(browser.find_element(By.NAME, "result")).select_by_value("fail")
    shown = [r for r in rows if r.is_displayed()]
    assert all(r.get_attribute("data-result") == "fail" for r in shown)
    assert browser.find_element(By.ID, "eval-count").text == f"{len(shown)} row(s) shown"
    Select(browser.find_element(By.NAME, "result")).select_by_value("")
    assert len([r for r in rows if r.is_displayed()]) == len(rows)
    assert "Release gate" in browser.page_source and browser.find_element(By.CSS_SELECTOR, "details pre").text
    _shot(browser, shots, "run")


def test_compare_by_ticking_runs(site, browser, shots):
    browser.get(site + "/compare")
    for box in browser.find_elements(By.CSS_SELECTOR, "input[name=run]"):
        box.click()
    browser.find_element(By.CSS_SELECTOR, "form.pick button").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "compare"))
    table = browser.find_element(By.ID, "compare").text
    assert "alpha" in table and "beta" in table and "(+0.2500)" in table
    canvases = browser.find_elements(By.CSS_SELECTOR, "#compare-charts canvas")
    alpha_loss = sum(isinstance(r.get(k), float) for rows in httpx.get(site + "/api/runs/alpha/metrics").json()[
        "curves"].values() for r in rows for k in ("loss", "val_loss"))
    assert canvases and int(canvases[0].get_attribute("data-points")) == 2 * alpha_loss  # two runs overlaid
    assert "alpha · base train" in browser.find_element(By.CSS_SELECTOR, "#compare-charts .legend").text
    _shot(browser, shots, "compare")


def test_data_page_shows_a_pack(site, browser, shots):
    browser.get(site + "/data")
    browser.find_element(By.LINK_TEXT, "tiny-demo-pack").click()
    _wait(browser, lambda d: "Readiness for pico" in d.page_source)
    assert "every file reads cleanly" in browser.page_source and "Preview: chat" in browser.page_source
    _shot(browser, shots, "data")


def test_chat_streams_a_reply(site, browser, shots):
    browser.get(site + "/chat")
    Select(browser.find_element(By.ID, "chat-model")).select_by_value("alpha/sft")
    browser.find_element(By.ID, "chat-input").send_keys("hello there")
    browser.find_element(By.ID, "chat-send").click()
    reply = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#chat-log li.assistant[data-done]"), 120)
    assert reply.get_attribute("data-done") == "true", browser.find_element(By.ID, "chat-status").text
    assert browser.find_element(By.CSS_SELECTOR, "#chat-log li.user").text == "hello there"
    want = httpx.post(site + "/llm/alpha/sft/v1/chat/completions", timeout=60, json={
        "model": "alpha/sft", "messages": [{"role": "user", "content": "hello there"}], "temperature": 0,
        "max_tokens": 64}).json()["choices"][0]["message"]["content"]
    assert reply.text == want.strip() or reply.text == want  # streamed greedy reply = the API's reply
    assert int(reply.get_attribute("data-chunks") or 0) >= (1 if want else 0)
    _shot(browser, shots, "chat")


def test_jobs_page_refuses_a_bad_request_and_lists_jobs(site, browser, shots):
    browser.get(site + "/jobs")
    form = browser.find_element(By.CSS_SELECTOR, "form.job[data-command=run-tiny]")
    form.find_element(By.NAME, "name").send_keys("alpha")  # taken
    form.find_element(By.TAG_NAME, "button").click()
    message = _wait(browser, lambda d: d.find_element(By.ID, "job-message").text or None)
    assert message.startswith("refused:") and "already exists" in message
    time.sleep(0.2)
    _shot(browser, shots, "jobs")
