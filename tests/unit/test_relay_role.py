"""Where the live relay runs (vigil/relay.py): the API nodes unless told otherwise, one role at a time."""

from __future__ import annotations

from pathlib import Path

import pytest

from vigil.relay import live_relay, relay_role
from vigil.settings import load


def settings(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "VIGIL_DATA_DIR": str(tmp_path),
        "VIGIL_KAFKA_URL": "kafka://127.0.0.1:9",
        "VIGIL_REDIS_URL": "redis://127.0.0.1:9/0",
        **extra,
    }


def test_the_api_nodes_relay_by_default_and_the_workers_do_not(tmp_path: Path) -> None:
    env = settings(tmp_path)
    assert relay_role(env) == "api"
    assert live_relay(load(env), env, "api") is not None
    assert live_relay(load(env), env, "worker") is None


@pytest.mark.parametrize(("value", "api", "worker"), [("worker", False, True), ("OFF", False, False)])
def test_the_relay_moves_or_stops_as_configured(tmp_path: Path, value: str, api: bool, worker: bool) -> None:
    env = settings(tmp_path, VIGIL_LIVE_RELAY=value)
    assert (live_relay(load(env), env, "api") is not None) is api
    assert (live_relay(load(env), env, "worker") is not None) is worker


def test_no_redis_no_relay(tmp_path: Path) -> None:
    env = settings(tmp_path, VIGIL_REDIS_URL="")
    assert live_relay(load(env), env, "api") is None


def test_an_unknown_role_stops_the_process_with_the_variable_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="VIGIL_LIVE_RELAY"):
        relay_role(settings(tmp_path, VIGIL_LIVE_RELAY="gateway"))
