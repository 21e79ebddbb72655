"""`dagster dev` serves the UI on 127.0.0.1 and its GraphQL API lists the tidpo assets."""

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

import pytest

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: bytes | None = None) -> bytes:
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read()


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "TIDPO_DATA_DIR": str(home / "data")}
    dagster = Path(sys.executable).parent / "dagster"
    # Own session: `dagster dev` spawns the webserver and daemon as children; killing the group stops all.
    process = subprocess.Popen(
        [str(dagster), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                _get(f"{base}/server_info")
                break
            except OSError:
                if process.poll() is not None:
                    pytest.fail(f"dagster dev exited with {process.returncode}")
                time.sleep(1)
        else:
            pytest.fail("dagster dev did not answer /server_info within 120 s")
        yield base, port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:  # `dagster dev` took over 20 s to shut its children down gracefully; the test needs only them gone
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_server_info_answers_on_loopback(webserver):
    base, _ = webserver
    info = json.loads(_get(f"{base}/server_info"))
    assert "dagster_webserver_version" in info


def test_not_reachable_on_other_interfaces(webserver):
    _, port = webserver
    addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {
        "127.0.0.1"
    }
    for address in addresses:
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex((address, port)) != 0, f"webserver reachable on {address}"


def test_graphql_lists_the_assets(webserver):
    base, _ = webserver
    query = json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode()
    deadline = time.monotonic() + 60
    keys: set[str] = set()
    while time.monotonic() < deadline:  # the code location may still be loading
        payload = json.loads(_get(f"{base}/graphql", query))
        keys = {"/".join(n["assetKey"]["path"]) for n in payload.get("data", {}).get("assetNodes", []) or []}
        if keys:
            break
        time.sleep(2)
    assert {
        "preference_pairs",
        "reference_model",
        "anchor_responses",
        "token_weights",
        "tidpo_policy",
        "evaluation",
    } <= keys


def test_make_ui_binds_loopback():
    makefile = (REPO / "Makefile").read_text()
    ui_lines = [line for line in makefile.splitlines() if "dagster dev" in line]
    assert ui_lines and all("-h 127.0.0.1" in line for line in ui_lines)
