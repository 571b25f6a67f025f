"""The browser demo in a real browser: headless Chromium drives the page the `demo` fixture (tests/conftest.py)
serves, and the quickstart's LoRA on the shipped base. `FINETUNE_REQUIRE_BROWSER=1` (CI) fails instead of skipping
where Chromium is missing."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ports import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def chromium_driver(profile: Path):
    """Headless Chromium with nothing running in the background that could reach the network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def require_browser() -> None:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        if os.environ.get("FINETUNE_REQUIRE_BROWSER"):
            pytest.fail("Chromium is missing: run `make browser` (apt-get install chromium chromium-driver)")
        pytest.skip("Chromium is missing: run `make browser` (apt-get install chromium chromium-driver)")


def assert_a_result_is_shown(wait) -> None:
    """Wait for a generated grid and check that the browser shows an image, not a blank."""
    from selenium.webdriver.common.by import By

    wait.until(lambda d: " x " in d.find_element(By.ID, "summary").text)
    result = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#result img"))
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", result))
    shown = np.asarray(Image.open(io.BytesIO(result.screenshot_as_png)).convert("L"), dtype=np.float64)
    assert shown.shape[0] > 100 and shown.std() > 10, "the result image is blank"


def waiting(driver, seconds: float):
    """A WebDriverWait that also asks again when gradio has redrawn an element it found (a toast, a dropdown) meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, ignored_exceptions=(StaleElementReferenceException,))


def click_when_ready(wait, css: str) -> None:
    """Click an element once the page shows it: gradio renders an accordion's contents only after it opens."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, css))).click()


def test_in_a_browser_pick_an_adapter_and_generate(demo, tmp_path):
    require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = chromium_driver(Path(tempfile.mkdtemp(dir=tmp_path)))
    try:
        wait = waiting(driver, 30)
        driver.get(demo.url)
        wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
        click_when_ready(wait, "#lora-1 input")
        click_when_ready(wait, '[role=option][aria-label="trained"]')
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#lora-1 input").get_attribute("value") == "trained")  # set as the page redraws
        strengths = driver.find_element(By.CSS_SELECTOR, "#strengths textarea")
        strengths.send_keys(Keys.CONTROL, "a")
        strengths.send_keys("0.5, 1")
        driver.find_element(By.ID, "generate").click()
        assert_a_result_is_shown(wait)
        assert "3 columns x 1 row" in driver.find_element(By.ID, "summary").text
        requested = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert requested and all(url.startswith(demo.url) for url in requested), [u for u in requested if not u.startswith(demo.url)]

        # A LoRA of another base: a readable message in the page, not a stack trace.
        click_when_ready(wait, "#lora-1 input")
        click_when_ready(wait, '[role=option][aria-label="other-base"]')
        driver.find_element(By.ID, "generate").click()
        toasts = lambda d: [t.get_attribute("textContent") for t in d.find_elements(By.CSS_SELECTOR, '[data-testid="toast-text"]')]  # noqa: E731
        said = wait.until(lambda d: [text for text in toasts(d) if "does not fit" in text])
        assert "LoRA 'other-base' does not fit base model" in said[0]
        assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text

        # A browser's upload reaches the demo's reader (no request's file but an upload is read), named by its file name.
        click_when_ready(wait, "#lora-1 input")
        click_when_ready(wait, '[role=option][aria-label="(none)"]')
        next(b for b in driver.find_elements(By.CSS_SELECTOR, "button.label-wrap") if "ControlNet" in b.text).click()
        click_when_ready(wait, "#controlnet input")
        click_when_ready(wait, '[role=option][aria-label="edges"]')  # a run's ControlNet by its run
        Image.new("L", (16, 16), 255).save(tmp_path / "small-mask.png")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type=file]")).send_keys(str(tmp_path / "small-mask.png"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "img[src*='small-mask']"))
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: any("small-mask.png (uploaded) is 16x16" in text for text in toasts(d)))
    finally:
        driver.quit()


def test_in_a_browser_the_quickstart_star_on_the_shipped_base(quickstart_lora, tmp_path):
    """The README's screenshot (FINETUNE_WRITE_DOCS=1 rewrites docs/images/demo.png): the shipped base beside
    the quickstart's LoRA at two strengths, for a star prompt."""
    require_browser()
    from selenium.webdriver.common.by import By

    from finetune.demo.engine import DemoEngine
    from finetune.demo.page import build_app, launch_app, resolve_base

    base, note = resolve_base(None)
    engine = DemoEngine(base, quickstart_lora.parent)
    app = build_app(engine, note=note, queue_size=4)
    url = launch_app(app, port=free_port(), max_upload_mb=1, block=False)
    driver = chromium_driver(Path(tempfile.mkdtemp(dir=tmp_path)))
    try:
        wait = waiting(driver, 60)
        driver.get(url)
        wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
        assert "toy-world base" in driver.find_element(By.ID, "base-note").text
        click_when_ready(wait, "#lora-1 input")
        click_when_ready(wait, f'[role=option][aria-label="{quickstart_lora.name}"]')
        strengths = driver.find_element(By.CSS_SELECTOR, "#strengths textarea")
        strengths.clear()
        strengths.send_keys("0.5, 1")
        driver.find_element(By.ID, "generate").click()
        assert_a_result_is_shown(wait)
        # The whole page, top to bottom: controls, the result, and the adapters table with its metadata.
        driver.execute_script("window.scrollTo(0, 0)")
        driver.set_window_size(1280, min(2400, driver.execute_script("return document.documentElement.scrollHeight") + 140))
        time.sleep(0.5)
        driver.save_screenshot(str(tmp_path / "demo.png"))
        if os.environ.get("FINETUNE_WRITE_DOCS") == "1":
            (ROOT / "docs" / "images").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp_path / "demo.png", ROOT / "docs" / "images" / "demo.png")
    finally:
        driver.quit()
        app.close()
