"""The test harness's server launcher: a server outlives no test run that was killed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


def _dead(pid: int) -> bool:
    # A killed orphan may linger as a zombie when nothing reaps it: dead all the same.
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" in f.read()
    except FileNotFoundError:
        return True


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_launched_module_dies_with_the_process_that_launched_it() -> None:
    # The middle process starts a long-running module the way ServerProcess starts the
    # server, prints its pid, and is then SIGKILLed (as a CI timeout would).
    launcher = (
        "import subprocess, sys, time\n"
        "from kvserve.server import testing\n"
        "p = subprocess.Popen([sys.executable, '-c', testing._BOOT, 'http.server', '0',\n"
        "                      '--bind', '127.0.0.1'], stdout=subprocess.DEVNULL,\n"
        "                     stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    mid = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    assert mid.stdout is not None
    child = int(mid.stdout.readline())
    time.sleep(1.0)  # the child is up and serving
    assert not _dead(child)
    mid.kill()
    mid.wait(10)
    deadline = time.monotonic() + 10
    while not _dead(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert _dead(child), "the launched module outlived its parent"
    finally:
        if not _dead(child):
            os.kill(child, 9)
