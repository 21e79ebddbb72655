"""End-to-end check of the UI: after a run, headless Chromium opens the asset graph (every asset name on
the page, e2e/asset-graph.png) and the metadata a user reads first on two asset pages: the preference
pairs' preview shows where chosen and rejected differ (e2e/preference-pairs-preview.png), and the
evaluation's key metrics are a rounded policy / reference / difference table (e2e/evaluation-key-metrics.png)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = [
    "preference_pairs",
    "reference_model",
    "reward_model",
    "anchor_responses",
    "token_weights",
    "tidpo_policy",
    "evaluation",
]
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


# Asset page -> (markdown metadata entry -> what it must show when opened).
ASSET_PAGES = {
    "preference_pairs": {"preview": ["chosen (where it differs)", "rejected (where it differs)"]},
    "evaluation": {"key_metrics": ["metric", "policy", "reference", "policy - reference", "reward_accuracy"]},
}


def _chromium() -> str:
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        raise SystemExit("chromium not found: `make e2e` installs Debian's chromium package")
    return browser_path


def _open(page, url: str, wait_for_text: str) -> None:
    page.goto(url)
    skip = page.get_by_role("button", name="Skip")  # Dagster's first-visit newsletter dialog
    try:
        skip.click(timeout=5_000)
    except Exception:
        pass
    try:
        page.get_by_text(wait_for_text).first.wait_for(timeout=60_000)
    except Exception:
        pass
    page.wait_for_timeout(2_000)


def check_asset_graph(base: str) -> list[str]:
    """The asset graph names every asset (screenshot e2e/asset-graph.png); returns what is missing."""
    from playwright.sync_api import sync_playwright

    screenshot = REPO / "e2e" / "asset-graph.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        _open(page, f"{base}/asset-groups", ASSETS[-1])
        page.screenshot(path=str(screenshot))
        text = page.inner_text("body")
        browser.close()
    print(f"asset graph: {screenshot} ({screenshot.stat().st_size} bytes)")
    return [name for name in ASSETS if name not in text]


def check_metadata(base: str) -> list[str]:
    """Open each asset's latest materialization, open each markdown entry of ASSET_PAGES (Dagster shows it
    in a dialog), screenshot it (e2e/<asset>-<entry>.png) and return what is missing from it."""
    from playwright.sync_api import sync_playwright

    missing = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        for asset, entries in ASSET_PAGES.items():
            _open(page, f"{base}/assets/{asset}", "Metadata")
            for entry, texts in entries.items():
                screenshot = REPO / "e2e" / f"{asset}-{entry}.png".replace("_", "-")
                row = page.locator("tr").filter(
                    has=page.locator("td", has_text=re.compile(f"^{re.escape(entry)}$"))
                )
                try:
                    row.first.wait_for(timeout=30_000)
                    collapsed = row.get_by_text("[Show Markdown]")
                    if collapsed.count():  # a long entry: Dagster opens it in a dialog
                        collapsed.first.click(timeout=30_000)
                        shown_in = page.get_by_role("dialog").last
                        shown_in.wait_for(timeout=30_000)
                        page.wait_for_timeout(1_000)
                    else:  # a short one is rendered in its row
                        shown_in = row.first
                    shown_in.screenshot(path=str(screenshot))
                    shown = shown_in.inner_text()
                    page.keyboard.press("Escape")
                except Exception as exc:  # no materialization yet, or the UI changed
                    missing.append(
                        f"{asset}/{entry}: cannot open ({type(exc).__name__}); run `make run` first"
                    )
                    continue
                absent = [text for text in texts if text not in shown]
                print(
                    f"{asset} / {entry}: {screenshot} ({screenshot.stat().st_size} bytes), shows {texts if not absent else shown[:300]!r}"
                )
                missing += [f"{asset}/{entry}: {text!r}" for text in absent]
        browser.close()
    return missing


def wait_for_assets(base: str, seconds: float) -> None:
    """The code location loads after the server answers (it imports torch): poll GraphQL until it lists assets."""
    query = json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            f"{base}/graphql", data=query, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            nodes = (json.loads(response.read()).get("data") or {}).get("assetNodes") or []
        if nodes:
            return
        time.sleep(2)
    raise TimeoutError(
        f"no assets listed by {base}/graphql within {seconds} s: is the code location failing to load?"
    )


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
        missing = check_asset_graph(base) + check_metadata(base)
        for what in missing:
            print(f"FAILED: {what}")
        if not missing:
            print(f"all {len(ASSETS)} assets on the graph; every checked metadata entry shows what it should")
        return 1 if missing else 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
