"""The web console in a real browser (issue 15): headless Chromium from Debian's packages,
driven by Selenium through Debian's chromedriver (no browser or driver downloads).

The Core's Replication page follows a lab live (server-sent events, no reload) through a
secondary lost, a suspend and a resume with its resync; a wrong password gets no page, an
action without the CSRF token is refused, and a refusal reads as ``coredr`` prints it.
Screenshots go to the test's temp folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from steelfusion.initiator import qemu_write
from tests.conftest import tool
from tests.nodes import lab_at, peer_linked, status, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]
MiB = 1 << 20
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _why_no_browser() -> str | None:
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} missing: apt-get install -y {pkg} (make install does it as root)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    why = _why_no_browser()
    if why is not None:
        print(f"SKIP test_console: {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1200,1100"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield d
    finally:
        d.quit()


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_core_console_follows_and_drives_replication(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    tool("qemu-img")
    shots = tmp_path / "screenshots"
    shots.mkdir()

    def shot(name: str) -> None:
        browser.save_screenshot(str(shots / f"{name}.png"))

    def text(el_id: str) -> str:
        return str(browser.find_element(By.ID, el_id).text)

    def confirm(action: str, words: str) -> None:
        browser.find_element(By.ID, f"action-{action}").click()
        wait_for(lambda: browser.find_element(By.ID, "confirm").is_displayed(), 5,
                 what=f"{action} confirmation")
        assert words in text("confirm-text")
        browser.find_element(By.ID, "confirm-ok").click()

    with lab_at(tmp_path / "lab") as lab:
        data = lab.up(luns=1, lun_size=64 * MiB, edges=1)
        core_a = data["cores"][0]
        password = Path(data["console_password_file"]).read_text().strip()
        url = f"http://{core_a['console']}/"
        wait_for(lambda: urllib.request.urlopen(url, timeout=2).status == 200,
                 what="console serving")

        # a wrong password gets no page: 401, nothing of the console
        code, body = post(url + "login", b"password=not-the-password", {})
        assert code == 401 and 'id="state"' not in body and "core-a" not in body
        code, _ = post(url + "api/action/suspend", b"{}", {})
        assert code == 401  # and no action without a session
        browser.get(url)
        browser.find_element(By.ID, "password").send_keys("not-the-password")
        browser.find_element(By.ID, "login-button").click()
        wait_for(lambda: "wrong password" in browser.page_source, 5, what="refused login")
        assert not browser.find_elements(By.ID, "state")

        browser.get(url)
        browser.find_element(By.ID, "password").send_keys(password)
        browser.find_element(By.ID, "login-button").click()
        wait_for(lambda: text("state") == "running", 15, what="running on the page")
        assert text("role") == "primary"
        browser.execute_script("window.sfNoReload = 'same page';")
        shot("1-running")

        # an action without the CSRF token is refused, and not run
        cookie = browser.get_cookie("sf_console")["value"]
        code, body = post(url + "api/action/suspend", b"{}",
                          {"Cookie": f"sf_console={cookie}", "Content-Type": "application/json"})
        assert code == 403 and json.loads(body)["code"] == "csrf", body
        assert status(core_a["control"])["replication"] == "running"
        # with it, a refusal is coredr's own line
        csrf = browser.execute_script(
            "return JSON.parse(document.getElementById('config').textContent).csrf")
        code, body = post(url + "api/action/failover", b"{}",
                          {"Cookie": f"sf_console={cookie}", "X-CSRF-Token": csrf,
                           "Content-Type": "application/json"})
        cli = subprocess.run([sys.executable, "-m", "steelfusion.coredr", "--core",
                              core_a["control"], "failover"], capture_output=True, text=True,
                             timeout=60)
        assert code == 200 and json.loads(body)["said"] == cli.stderr.strip(), (body, cli.stderr)

        # the secondary lost: the page shows paused by itself
        lab.kill("core-b")
        wait_for(lambda: text("state") == "paused", 20, what="paused on the page")
        shot("2-paused")

        confirm("suspend", "The Witness must approve")
        wait_for(lambda: text("state") == "suspended", 20, what="suspended on the page")
        assert text("result") == "replication suspended"
        shot("3-suspended")
        src = tmp_path / "while-suspended.raw"
        src.write_bytes(os.urandom(32 * MiB))
        qemu_write(src, data["edges"][0]["targets"][0]["url"])  # journaled: the resync copies it

        lab.start("core-b")
        wait_for(lambda: peer_linked(core_a["control"]), 30, what="peer link back")
        confirm("resume", "resync")
        wait_for(lambda: browser.find_element(By.ID, "resync").is_displayed(), 20,
                 what="a resync progress bar")
        wait_for(lambda: text("state") == "running", 60, what="running again on the page")
        wait_for(lambda: browser.find_element(By.ID, "resync").get_attribute("value") == "100",
                 10, what="the bar at 100%")
        assert text("resync-text") == "done"
        assert text("result") == "replication running"  # coredr resume's last line
        assert browser.execute_script("return window.sfNoReload") == "same page"
        events = text("events")
        assert "resync_done" in events and "replication_state" in events
        shot("4-resynced")

        # the Edge's page: its primary Core, nothing uncommitted, the host's writes counted
        browser.get(f"http://{data['edges'][0]['console']}/")
        browser.find_element(By.ID, "password").send_keys(password)
        browser.find_element(By.ID, "login-button").click()
        wait_for(lambda: text("core").startswith("core-a"), 15, what="the Edge page")
        wait_for(lambda: text("uncommitted").startswith("0 B"), 30, what="all committed")
        assert "32.0 MiB" in text("luns")
        shot("5-edge")
    keep = os.environ.get("STEELFUSION_CONSOLE_SHOT")  # where to copy one for the README
    if keep:
        shutil.copy(shots / "4-resynced.png", keep)
