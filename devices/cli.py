"""`vigil simulate`: arguments and the run; the composition root wires registration in through `register`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from devices.fleet import DeviceSpec, Fleet, plan_fleet
from devices.scenarios import SCENARIOS
from devices.simulator import Simulator

Register = Callable[[list[DeviceSpec]], Awaitable[Fleet]]


def _mqtt_default() -> tuple[str, int]:
    """Host and port of the broker: VIGIL_MQTT_URL when it names an external one, else VIGIL_HOST/PORT."""
    host, port = os.environ.get("VIGIL_HOST", "127.0.0.1"), int(os.environ.get("VIGIL_MQTT_PORT", "1883"))
    url = os.environ.get("VIGIL_MQTT_URL")
    if url:
        parts = urlsplit(url)
        host, port = parts.hostname or host, parts.port or port
    return host, port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `vigil simulate` (defaults from the environment, as every command reads it)."""
    mqtt_host, mqtt_port = _mqtt_default()
    coap_port = int(os.environ.get("VIGIL_COAP_PORT", "5683"))
    coaps_port = int(os.environ.get("VIGIL_COAPS_PORT", str(coap_port + 1)))
    parser.add_argument(
        "--scenario", default="mix", help="a scenario name for every device, or 'mix' (default)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="same seed, same scenario: same values (default 0)"
    )
    parser.add_argument(
        "--speed", type=float, default=1.0, help="scenario seconds per wall second (default 1)"
    )
    parser.add_argument("--beds", type=int, default=4, help="monitored beds in the planned ward (default 4)")
    parser.add_argument(
        "--duration", type=float, default=None, help="scenario seconds to run (default: until interrupted)"
    )
    parser.add_argument(
        "--fleet",
        type=Path,
        default=None,
        help="fleet JSON: used if it exists, else written after registering",
    )
    parser.add_argument("--transport", choices=("mqtt", "coap"), default="mqtt", help="for a planned fleet")
    parser.add_argument(
        "--start-ms", type=int, default=None, help="device time of scenario second 0 (epoch ms)"
    )
    parser.add_argument("--mqtt-host", default=mqtt_host)
    parser.add_argument("--mqtt-port", type=int, default=mqtt_port)
    parser.add_argument("--coap-host", default=os.environ.get("VIGIL_HOST", "127.0.0.1"))
    parser.add_argument("--coap-port", type=int, default=coap_port)
    parser.add_argument("--coaps-port", type=int, default=coaps_port)
    parser.add_argument("--list-scenarios", action="store_true", help="print the scenarios and exit")


async def run(args: argparse.Namespace, register: Register | None) -> int:
    """Run `vigil simulate`; answers the process exit code."""
    if args.list_scenarios:
        for s in SCENARIOS.values():
            print(f"{s.name:16} {s.title}")
        return 0
    if args.scenario != "mix" and args.scenario not in SCENARIOS:
        print(f"vigil simulate: unknown scenario {args.scenario!r} (see --list-scenarios)", file=sys.stderr)
        return 2
    fleet_path: Path | None = args.fleet
    try:
        if fleet_path is not None and fleet_path.exists():  # noqa: ASYNC240 - once, before any device runs
            fleet = Fleet.load(fleet_path)
        else:
            specs = plan_fleet(args.beds, args.scenario, seed=args.seed, transport=args.transport)
            if register is not None:
                fleet = await register(specs)
            else:
                # Without a registry the devices have no secrets: only an anonymous broker takes them.
                print("vigil simulate: no registry; devices connect without secrets", file=sys.stderr)
                fleet = Fleet.from_specs(specs, {s.id: "" for s in specs})
            if fleet_path is not None:
                fleet.save(fleet_path)
    except (OSError, ValueError) as e:
        print(f"vigil simulate: {e}", file=sys.stderr)
        return 2
    simulator = Simulator(
        fleet,
        mqtt_host=args.mqtt_host,
        mqtt_port=args.mqtt_port,
        coap_host=args.coap_host,
        coap_port=args.coap_port,
        coaps_port=args.coaps_port,
        speed=args.speed,
        seed=args.seed,
        duration_s=args.duration,
        start_ms=args.start_ms,
    )
    await simulator.run()
    sent, refused, unsent = (sum(c.values()) for c in (simulator.sent, simulator.refused, simulator.unsent))
    print(
        f"vigil simulate: {len(fleet.devices)} devices, {sent} messages acknowledged, {refused} refused, "
        f"{unsent} not delivered"
    )
    return 1 if simulator.unsent else 0
