"""End-to-end check of the UI: after a run, headless Chromium opens the asset graph, every asset name
is on the page, and a screenshot is saved (e2e/asset-graph.png)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = ["preference_pairs", "reference_model", "anchor_responses", "token_weights", "tidpo_policy", "evaluation"]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
    "--virtual-time-budget=25000",
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


def chromium(url: str, *args: str) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: `make e2e` installs Debian's chromium package")
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
            capture_output=True,
            text=True,
            timeout=180,
        )
    return result.stdout


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
        time.sleep(5)  # let the code location finish loading
        url = f"{base}/asset-groups"
        dom = chromium(url, "--dump-dom")
        missing = [name for name in ASSETS if name not in dom]
        screenshot = REPO / "e2e" / "asset-graph.png"
        chromium(url, f"--screenshot={screenshot}")
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
