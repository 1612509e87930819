"""vigil/devstack.py: the scaled runtime on one machine starts, answers, survives a kill -9, stops."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import pytest

from vigil.devstack import ROLES, DevStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone as far as anyone can tell
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_stack_starts_answers_restarts_a_part_and_stops_leaving_nothing(tmp_path: Path) -> None:
    stack = DevStack(tmp_path / "stack", admin_password="devstack-pw-1")
    try:
        stack.start()
        names = [n for role in ROLES for n in stack.names(role)]
        assert len(names) == 6
        for name in names:
            r = httpx.get(stack.url(name) + "/readyz", timeout=10)
            assert r.status_code == 200, f"{name}: {r.text}"
        assert httpx.get(stack.influx_url + "/ping", timeout=5).status_code == 204
        dbs = httpx.get(stack.influx_url + "/query", params={"q": "SHOW DATABASES"}, timeout=5).json()
        assert ["vigil"] in dbs["results"][0]["series"][0]["values"]
        for url in stack.api_urls:  # the admin exists, and a token of one node works on the other
            r = httpx.post(
                url + "/api/v1/auth/token", json={"username": "admin", "password": "devstack-pw-1"}
            )
            assert r.status_code == 200, r.text
        assert "devstack-pw-1" in stack.summary()

        before = stack.parts["api2"].pid
        stack.kill9("api2")
        assert before is not None and not alive(before)
        stack.restart("api2")
        assert stack.parts["api2"].pid != before
        assert httpx.get(stack.url("api2") + "/readyz", timeout=10).status_code == 200
        pids = stack.pids()
        assert set(pids) == set(stack.parts)
    finally:
        stack.stop()
    assert not [n for n, pid in pids.items() if alive(pid)]
    left = [n for n, p in stack.ports.items() if not n.endswith(("-coap", "-coaps")) and listening(p)]
    assert left == [], f"still listening: {left}"
    # every child too: nothing on this machine still runs from the stack's data dir
    ours = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(stack.root) in cmd and alive(int(proc.name)):
                ours.append(cmd.replace("\0", " "))
    assert ours == []
