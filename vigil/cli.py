"""The `vigil` command: run the embedded hub, manage devices and users, simulate devices."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence

import orjson

from streams.schemas import DEVICE_TYPES
from vigil import gctune, logs, settings

ROLES = ("nurse", "charge_nurse", "doctor", "dispatcher", "admin")


def _print(obj: object) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


async def _run(cfg: settings.Settings) -> None:
    from vigil.embedded import EmbeddedHub

    hub = EmbeddedHub(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await hub.start()
    s = hub.settings
    mqtt = (
        f"{s.mqtt_url.host}:{s.mqtt_url.port} (external)"
        if s.mqtt_url
        else f"{s.host}:{s.mqtt_port} (embedded)"
    )
    sys.stderr.write(
        f"vigil: ready. board http://{s.host}:{s.http_port}/  mqtt {mqtt}  "
        f"coap {s.host}:{s.coap_port}/udp  coaps {s.host}:{s.coaps_port}/udp  data {s.data_dir}\n"
    )
    await stop.wait()
    await hub.stop()


async def _devices_add(cfg: settings.Settings, a: argparse.Namespace) -> None:
    from records.crypto import SecretCipher
    from records.db import Database, sqlite_url
    from records.devices import add_device

    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(cfg.database_url or sqlite_url(cfg.data_dir))
    try:
        await db.migrate()
        out = await add_device(
            db,
            SecretCipher.from_data_dir(cfg.data_dir),
            device_id=a.id,
            type=a.type,
            site=a.site or cfg.default_site,
            unit=a.unit,
            bed=a.bed,
            patient=a.patient,
            allow_plain_coap=a.allow_plain_coap,
            at=time.time_ns() // 1_000_000,
        )
    finally:
        await db.close()
    _print(out)


async def _users_add(cfg: settings.Settings, a: argparse.Namespace) -> None:
    from records.db import Database, sqlite_url
    from records.people import add_user

    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(cfg.database_url or sqlite_url(cfg.data_dir))
    try:
        await db.migrate()
        out = await add_user(
            db,
            username=a.name,
            role=a.role,
            sites=a.site or [cfg.default_site],
            units=a.unit or [],
            password=a.password,
            provider_id=a.provider_id,
            at=time.time_ns() // 1_000_000,
        )
    finally:
        await db.close()
    _print(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vigil", description="Vigil: real-time clinical event hub")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="embedded runtime: gateway, processors, API and dashboards in one process")
    for role in ("gateway", "worker", "api"):
        sub.add_parser(role, help=f"scaled runtime: {role} role")

    dev = sub.add_parser("devices", help="device registry").add_subparsers(dest="action", required=True)
    add = dev.add_parser("add", help="register a device; prints its id and secret (shown once)")
    add.add_argument("id")
    add.add_argument("--type", required=True, choices=DEVICE_TYPES)
    add.add_argument("--site")
    add.add_argument("--unit")
    add.add_argument("--bed")
    add.add_argument("--patient")
    add.add_argument("--allow-plain-coap", action="store_true")

    users = sub.add_parser("users", help="users").add_subparsers(dest="action", required=True)
    uadd = users.add_parser("add", help="create a user; prints the username (and a generated password)")
    uadd.add_argument("name")
    uadd.add_argument("--role", required=True, choices=ROLES)
    uadd.add_argument("--site", action="append")
    uadd.add_argument("--unit", action="append")
    uadd.add_argument("--password")
    uadd.add_argument("--provider-id")

    sim = sub.add_parser("simulate", help="device simulator over the real protocols")
    from devices.cli import add_arguments

    add_arguments(sim)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logs.setup(os.environ.get("VIGIL_LOG_LEVEL", "INFO"))
    cfg = settings.load()
    if args.command in ("run", "gateway", "worker", "api"):
        gctune.tune(os.environ)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    try:
        if args.command == "run":
            asyncio.run(_run(cfg))
        elif args.command == "gateway":
            from vigil.scaled import run_gateway

            asyncio.run(run_gateway(cfg))
        elif args.command == "worker":
            from vigil.worker import main as run_worker

            run_worker(cfg)
        elif args.command == "api":
            from vigil.api_node import run_api

            asyncio.run(run_api(cfg))
        elif args.command == "devices":
            asyncio.run(_devices_add(cfg, args))
        elif args.command == "users":
            asyncio.run(_users_add(cfg, args))
        elif args.command == "simulate":
            from vigil.simulate import run_simulator

            asyncio.run(run_simulator(cfg, args))
    except KeyboardInterrupt:
        pass
    except ValueError as exc:  # a records error (duplicate id, bad role, ...): one clear line
        raise SystemExit(f"vigil: {exc}") from None


if __name__ == "__main__":
    main()
