"""Render a page in headless Chromium (Debian's chromium) and list the network requests it made."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

NETWORK_SCHEMES = ("http:", "https:", "ws:", "wss:", "ftp:")


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    return exe


def render(page: Path, width: int = 1200, height: int = 2000) -> tuple[Path, list[str]]:
    """Screenshot ``page`` and return the network URLs the page itself requested.

    Chromium's own background requests (time sync, account checks) have the initiator
    "not an origin" in the net log; requests made by a ``file://`` page have the initiator
    "null". Only the latter are returned.
    """
    work = Path(tempfile.mkdtemp(prefix="chromium-"))
    shot, netlog = work / "shot.png", work / "netlog.json"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={work / 'profile'}", f"--log-net-log={netlog}", "--net-log-capture-mode=Everything",
           f"--window-size={width},{height}", f"--screenshot={shot}", page.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    log = json.loads(netlog.read_text())
    types = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    requests = []
    for event in log["events"]:
        params = event.get("params") or {}
        if types.get(event["type"]) == "URL_REQUEST_START_JOB" and params.get("url"):
            if params["url"].startswith(NETWORK_SCHEMES) and params.get("initiator") != "not an origin":
                requests.append(params["url"])
    return shot, requests


def is_blank(png: Path) -> bool:
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    return pixels.std() < 2.0
