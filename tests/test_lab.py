"""`make lab`: its JupyterLab command line starts a server that answers on 127.0.0.1, then stops.

The command is read from the Makefile's ``lab`` recipe, so the test cannot drift from it; it runs
with this interpreter as ``$(PY)`` rather than through ``make``, which would first refresh the
virtual environment whenever pyproject.toml is newer than its stamp.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def lab_recipe() -> list[str]:
    """The ``lab`` target's prerequisites and its one recipe line."""
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    match = re.search(r"^lab:(.*)\n\t(.+)$", text, re.M)
    assert match, "the Makefile has no `lab:` target with a recipe line"
    return [match.group(1).strip(), match.group(2).strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lab_is_set_up_like_the_others_and_in_help() -> None:
    prereqs, line = lab_recipe()
    assert prereqs == "$(STAMP)"
    assert line.startswith("$(PY) -m jupyter lab") and "127.0.0.1" in line and "$(LAB_ARGS)" in line
    assert "make lab" in (REPO / "Makefile").read_text(encoding="utf-8").split("\nvenv:")[0]  # help


def test_lab_starts_and_answers(tmp_path: Path) -> None:
    pytest.importorskip("jupyterlab")
    port, token = free_port(), "course-test-token"
    line = lab_recipe()[1].replace("$(PY)", shlex.quote(sys.executable)).replace(
        "$(LAB_ARGS)", f"--port {port} --ServerApp.port_retries=0 --IdentityProvider.token={token}"
        + (" --allow-root" if os.geteuid() == 0 else ""))  # CI containers run as root
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_PLATFORM_DIRS="1")
    log = open(tmp_path / "lab.log", "wb")
    proc = subprocess.Popen(shlex.split(line), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/status",
                                             headers={"Authorization": f"token {token}"})
                with urllib.request.urlopen(req, timeout=2) as reply:
                    status = json.loads(reply.read())
                break
            except OSError:
                time.sleep(0.5)
        assert status is not None, ("JupyterLab did not answer within 60 s:\n"
                                    + (tmp_path / "lab.log").read_text(errors="replace")[-3000:])
        assert "started" in status
        # The server runs from the repository root, on the course environment.
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/api/contents/solutions",
                headers={"Authorization": f"token {token}"}), timeout=5) as reply:
            assert json.loads(reply.read())["type"] == "directory"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
