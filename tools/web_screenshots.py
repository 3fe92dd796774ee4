#!/usr/bin/env python
"""Screenshots of every `picochat web` page over real runs, with Debian's headless Chromium: the pictures in
docs/web.md.

    python tools/web_screenshots.py --runs-root runs --packs-root examples --out docs/web

Serves the workbench on a free loopback port, opens the runs list, the first run, a comparison of the first
two runs, the first pack, a chat with the first model (one message, streamed) and the jobs page, and saves
one PNG of each (window 1280 x HEIGHT).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-root", type=Path, required=True)
    p.add_argument("--packs-root", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--height", type=int, default=1100)
    p.add_argument("--message", default="What is picochat?")
    args = p.parse_args(argv)

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from picochat_jax.web import store
    from picochat_jax.web.app import WebSettings, create_web_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_web_app(WebSettings(args.runs_root, args.packs_root)),
                                           log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size=1280,{args.height}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    args.out.mkdir(parents=True, exist_ok=True)
    saved = []

    def shot(name: str) -> None:
        driver.execute_script("window.scrollTo(0, 0)")
        path = args.out / f"{name}.png"
        driver.save_screenshot(str(path))
        saved.append(path)

    runs = [r["name"] for r in store.list_runs(args.runs_root)]
    packs = store.list_packs(args.packs_root)
    models = store.list_models(args.runs_root)
    try:
        driver.get(base + "/")
        shot("runs")
        if runs:
            driver.get(f"{base}/runs/{quote(runs[0])}")
            WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#charts canvas"))
            shot("run")
        if len(runs) >= 2:
            driver.get(f"{base}/compare?run={quote(runs[0])}&run={quote(runs[1])}")
            shot("compare")
        if packs:
            driver.get(f"{base}/data/{quote(packs[0]['path'])}")
            shot("data")
        if models:
            driver.get(base + "/chat")
            Select(driver.find_element(By.ID, "chat-model")).select_by_value(models[0]["id"])
            driver.find_element(By.ID, "chat-input").send_keys(args.message)
            driver.find_element(By.ID, "chat-send").click()
            WebDriverWait(driver, 300).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log li.assistant[data-done]"))
            shot("chat")
        driver.get(base + "/jobs")
        shot("jobs")
    finally:
        driver.quit()
        server.should_exit = True
    for path in saved:
        print(path)
    return saved


if __name__ == "__main__":
    main()
