"""The web page in a real headless Chromium (Debian's, through Selenium): a question typed, an
answer with a linked citation back from tierserve; and the JSON API's errors."""

from __future__ import annotations

import os
import shutil
import threading
import time

import httpx
import pytest

from tests.server.conftest import free_port
from tierintel.answer import Answerer
from tierintel.web import create_app

from .conftest import DEAD
from .test_answer import tierserve_answerer


@pytest.fixture(scope="module")
def site(intel, tierserve):
    import uvicorn

    intel._answerer = tierserve_answerer(tierserve)
    server = uvicorn.Server(uvicorn.Config(create_app(intel), port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(10)
    intel._answerer = None


def test_status_reports_feed_freshness(site):
    status = httpx.get(site + "/api/status", timeout=10).json()
    assert status["as_of"] == "2026-11-29" and status["records"]["cves"] == 42
    assert status["feeds"]["kev"]["version"] == "2026.11.28"
    assert status["feeds"]["epss"]["newest_feed_date"].startswith("2026-11-29")


def test_api_errors_are_openai_shaped(site, intel):
    bad = httpx.post(site + "/api/ask", json={"question": ""}, timeout=10)
    assert bad.status_code == 400
    assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
    assert "question" in bad.json()["error"]["message"]
    assert httpx.post(site + "/api/ask", content=b"{", timeout=10).status_code == 400
    working, intel._answerer = intel._answerer, Answerer(DEAD, "any", timeout_s=5)
    try:
        down = httpx.post(site + "/api/ask", json={"question": "What is CVE-2026-41021?"},
                          timeout=30)
    finally:
        intel._answerer = working
    assert down.status_code == 503 and "unreachable" in down.json()["error"]["message"]
    nothing = httpx.post(site + "/api/ask", json={"question": "What is CVE-2031-00001?"},
                         timeout=30).json()
    assert nothing["empty"] and nothing["text"].startswith("The index has no records")


@pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("chromedriver") is None,
                    reason="Debian's chromium and chromium-driver are not installed (make test "
                           "installs them when it runs as root)")
def test_a_question_typed_in_chromium_gets_an_answer_with_a_citation(site, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(site + "/")
        WebDriverWait(driver, 20).until(
            ec.text_to_be_present_in_element((By.ID, "freshness"), "42 CVEs"))
        driver.find_element(By.ID, "question").send_keys("Which KEV entries affect Northwind Gateway?")
        driver.find_element(By.ID, "ask").click()
        links = WebDriverWait(driver, 120).until(
            ec.presence_of_all_elements_located((By.CSS_SELECTOR, "#sources a.source")))
        assert [a.text for a in links] == ["CVE-2026-41033", "CVE-2026-41021", "CVE-2026-38901"]
        assert links[1].get_attribute("href") == "https://nvd.nist.gov/vuln/detail/CVE-2026-41021"
        answer = driver.find_element(By.ID, "answer").text
        assert "Evidence:" in answer and "in CISA KEV since 2026-11-05" in answer
        shot = os.environ.get("TIERINTEL_SCREENSHOT") or str(tmp_path / "page.png")
        assert driver.save_screenshot(shot)
    finally:
        driver.quit()
