"""The served page in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by
Selenium against ``vitkit serve`` on 127.0.0.1. ``make browser-deps`` (run by ``.ci/run``) installs the browser;
where none can be installed this test is skipped with a loud reason (``pytest -ra`` prints it)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitkit

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("BROWSER TEST SKIPPED: no chromium/chromedriver on PATH (run `make browser-deps` as root, or "
                "apt-get install chromium chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="BROWSER TEST SKIPPED: selenium is not installed")
uvicorn = pytest.importorskip("uvicorn")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from _tiny import save_tiny_classifier_run  # noqa: E402
from vitkit.tools.serve import create_app  # noqa: E402

# The README's screenshot: VITKIT_SERVE_RUN=<a trained run> VITKIT_SCREENSHOT_DIR=docs/img pytest tests/test_browser.py
SCREENSHOT_DIR = Path(os.environ["VITKIT_SCREENSHOT_DIR"]) if os.environ.get("VITKIT_SCREENSHOT_DIR") else None
SERVE_RUN = os.environ.get("VITKIT_SERVE_RUN")


def _fmnist_image(tmp_path: Path) -> Path:
    """A Fashion-MNIST test image when the dataset is on this machine, else a drawn 'trouser' silhouette."""
    from vitkit.data.fashion_mnist import find_dir, load_arrays

    folder = find_dir(None, "test")
    if folder is not None:
        arr = load_arrays(folder, "test")[0][0]  # test image 0 (an ankle boot)
    else:  # no dataset on this machine: the page is tested all the same, with a drawn pair of trousers
        arr = np.zeros((28, 28), np.uint8)
        arr[3:26, 9:13] = 220
        arr[3:26, 15:19] = 220
        arr[3:8, 9:19] = 220
    path = tmp_path / "fmnist.png"
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    run = Path(SERVE_RUN) if SERVE_RUN else tmp_path / "run"
    if not SERVE_RUN:  # a small untrained model: the page is what is tested
        save_tiny_classifier_run(run)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(run), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", run
    srv.should_exit = True
    thread.join(10)


def test_upload_shows_top5_and_overlay_in_chromium(server, tmp_path):
    url, run = server
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,800"):
        options.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "parameters" in d.find_element(By.ID, "card").text)
        image = _fmnist_image(tmp_path)
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "body[data-state='done']")))
        items = driver.find_elements(By.CSS_SELECTOR, "#top li.prediction")
        assert len(items) == 5
        overlay = driver.find_element(By.ID, "overlay").get_attribute("src")
        assert overlay.startswith("data:image/png;base64,")
        # the overlay image really decoded in the browser
        assert driver.execute_script("return document.getElementById('overlay').naturalWidth") > 0
        expected = vitkit.tools.predict_images(vitkit.tools.load_model(run), [image], topk=5)[0]["top"]
        assert [li.get_attribute("data-label") for li in items] == [name for name, _ in expected]
        shot = (SCREENSHOT_DIR or tmp_path) / "serve_page.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 0
    finally:
        driver.quit()
