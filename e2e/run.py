"""End-to-end check of the UI: after a run, headless Chromium opens the asset graph, every asset name
is on the page, and a screenshot is saved (e2e/asset-graph.png)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = ["preference_pairs", "reference_model", "reward_model", "anchor_responses", "token_weights", "tidpo_policy", "evaluation"]
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=3).read()
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


def open_asset_graph(url: str, screenshot: Path) -> str:
    """Open the page in Debian's Chromium driven by Playwright; return the rendered page text."""
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        raise SystemExit("chromium not found: `make e2e` installs Debian's chromium package")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(url)
        skip = page.get_by_role("button", name="Skip")  # Dagster's first-visit newsletter dialog
        try:
            skip.click(timeout=10_000)
        except Exception:
            pass
        try:
            page.get_by_text(ASSETS[-1], exact=True).first.wait_for(timeout=60_000)
        except Exception:
            pass
        page.wait_for_timeout(2_000)
        page.screenshot(path=str(screenshot))
        text = page.inner_text("body")
        browser.close()
    return text


def wait_for_assets(base: str, seconds: float) -> None:
    """The code location loads after the server answers (it imports torch): poll GraphQL until it lists assets."""
    query = json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        request = urllib.request.Request(f"{base}/graphql", data=query, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            nodes = (json.loads(response.read()).get("data") or {}).get("assetNodes") or []
        if nodes:
            return
        time.sleep(2)
    raise TimeoutError(f"no assets listed by {base}/graphql within {seconds} s: is the code location failing to load?")


def main() -> int:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    dagster = Path(sys.executable).parent / "dagster"
    server = subprocess.Popen(
        [str(dagster), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(f"{base}/server_info", 120)
        wait_for_assets(base, 180)
        url = f"{base}/asset-groups"
        screenshot = REPO / "e2e" / "asset-graph.png"
        text = open_asset_graph(url, screenshot)
        missing = [name for name in ASSETS if name not in text]
        print(f"asset graph: {url}\nscreenshot: {screenshot} ({screenshot.stat().st_size if screenshot.exists() else 0} bytes)")
        if missing:
            print(f"FAILED: assets missing from the page: {missing}")
            return 1
        if not screenshot.exists() or screenshot.stat().st_size == 0:
            print("FAILED: no screenshot written")
            return 1
        print(f"all {len(ASSETS)} assets are on the page")
        return 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
