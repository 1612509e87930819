"""A recorded simulator run without a broker: the payloads a ward's devices publish, stored compactly.

The alarm-load figures are computed on a committed trace, so engine changes are compared on the same data.
A trace is one xz stream: a magic line, a JSON header, then per-device columns. Each message is split into a
skeleton (kind, keys, strings, codes: few distinct ones) and its numbers, which go to delta-coded integer
columns per (device, skeleton, slot). docs/TRACE.md describes the format and the committed file.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import lzma
import math
import os
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

from devices.fleet import DeviceSpec, SimDevice, plan_fleet
from devices.messages import messages_at, model_for, rfc3339

MAGIC = b"VIGIL-TRACE 1\n"
FORMAT = "vigil-trace/1"

# The committed trace (bench/data/): docs/TRACE.md gives its checksums.
DEFAULT_BEDS = 40
DEFAULT_SEED = 0
DEFAULT_DURATION_S = 86_400
DEFAULT_START_MS = 1_795_392_000_000  # 2026-11-23T00:00:00Z
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "bench" / "data" / "ward40-seed0-24h.vtrace.xz"

# Template markers: a skeleton string starting with NUL is a slot, never a literal (checked on record).
_INT, _FLOAT, _SEQ, _BOOT, _TS = "\0i", "\0f", "\0seq", "\0boot", "\0ts"
_WIDTHS = (("b", 1), ("h", 2), ("i", 4), ("q", 8))
_MAX_DECIMALS = 9

TraceMessage = tuple[int, str, str, dict[str, Any]]  # (scenario t_ms, device id, kind, payload)


@dataclass(frozen=True, slots=True)
class TraceInfo:
    """What a trace was recorded from; `start_ms` is the device time of scenario second 0."""

    seed: int
    beds: int
    scenario: str
    start_ms: int
    duration_s: int
    messages: int
    content_sha256: str
    devices: tuple[DeviceSpec, ...]


# ---- record ---------------------------------------------------------------------------------------------


def _skeleton(value: Any, slots: list[Any], head: dict[str, Any] | None) -> Any:
    """The template of a payload: numbers become slots (appended to `slots`), the rest stays literal."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if head is not None and k in head and v == head[k]:
                out[k] = head[k + "_marker"]
            else:
                out[k] = _skeleton(v, slots, None)
        return out
    if isinstance(value, list):
        return [_skeleton(v, slots, None) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        slots.append(value)
        return _INT
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"a trace holds finite numbers only, not {value!r}")
        slots.append(value)
        return _FLOAT
    if isinstance(value, str):
        if value.startswith("\0"):
            raise ValueError("a trace string may not start with NUL (reserved for slots)")
        return value
    raise TypeError(f"not a JSON value: {value!r}")


def _int_column(values: Sequence[int]) -> tuple[bytes, int]:
    """Delta-coded little-endian integers in the narrowest width that holds every delta."""
    deltas = [b - a for a, b in itertools.pairwise(itertools.chain((0,), values))]
    lo, hi = min(deltas, default=0), max(deltas, default=0)
    for code, width in _WIDTHS:
        bound = 1 << (8 * width - 1)
        if -bound <= lo and hi < bound:
            arr = array(code, deltas)
            if sys.byteorder == "big":
                arr.byteswap()
            return arr.tobytes(), width
    raise ValueError("an integer in a trace does not fit in 64 bits")


def _decimals(values: Sequence[float]) -> int | None:
    """The fewest decimals d with every value exactly m / 10**d (so it is stored as the integer m)."""
    for d in range(_MAX_DECIMALS + 1):
        p = 10**d
        if all(repr(round(v * p) / p) == repr(v) for v in values):
            return d
    return None


def _encode_column(kind: str, values: Sequence[Any]) -> tuple[bytes, list[Any]]:
    """Column bytes and its descriptor [count, width, decimals]; decimals None: raw float64."""
    if kind == _INT:
        data, width = _int_column(values)
        return data, [len(values), width, -1]
    d = _decimals(values)
    if d is None:
        arr = array("d", values)
        if sys.byteorder == "big":
            arr.byteswap()
        return arr.tobytes(), [len(values), 8, None]
    data, width = _int_column([round(v * 10**d) for v in values])
    return data, [len(values), width, d]


def device_messages(
    device: SimDevice, *, seed: int, start_ms: int, duration_s: int
) -> Iterator[TraceMessage]:
    """What the simulator's device publishes over `duration_s` scenario seconds, in order (no broker)."""
    model = model_for(device, seed=seed, start_ms=start_ms)
    for n in range(duration_s):
        for kind, payload in messages_at(model, n * 1000):
            yield n * 1000, device.id, kind, payload


def _message_digest(h: Any, t_ms: int, device_id: str, kind: str, payload: dict[str, Any]) -> None:
    h.update(orjson.dumps([t_ms, device_id, kind, payload]))
    h.update(b"\n")


def _encode_device(args: tuple[SimDevice, int, int, int]) -> dict[str, Any]:
    """One device's skeletons (local ids), columns and content digest; runs in a worker process."""
    device, seed, start_ms, duration_s = args
    model = model_for(device, seed=seed, start_ms=start_ms)
    skeletons: dict[str, int] = {}
    times: list[int] = []
    skel_ids: list[int] = []
    columns: list[list[list[Any]]] = []  # per local skeleton, per slot: values
    kinds: list[list[str]] = []
    digest = hashlib.sha256()
    for n in range(duration_s):
        for kind, payload in messages_at(model, n * 1000):
            _message_digest(digest, n * 1000, device.id, kind, payload)
            head = {"seq": n + 1, "boot": model.boot, "ts": _ts(start_ms + n * 1000)}
            head |= {"seq_marker": _SEQ, "boot_marker": _BOOT, "ts_marker": _TS}
            values: list[Any] = []
            template = orjson.dumps([kind, _skeleton(payload, values, head)]).decode()
            sid = skeletons.setdefault(template, len(skeletons))
            if sid == len(columns):
                columns.append([[] for _ in values])
                kinds.append([_INT if isinstance(v, int) else _FLOAT for v in values])
            for col, v in zip(columns[sid], values, strict=True):
                col.append(v)
            times.append(n)
            skel_ids.append(sid)
    blobs: list[bytes] = []
    t_data, t_width = _int_column(times)
    s_data, s_width = _int_column(skel_ids)
    blobs += [t_data, s_data]
    slots: list[list[list[Any]]] = []
    for sid in range(len(columns)):
        descs = []
        for kind, col in zip(kinds[sid], columns[sid], strict=True):
            data, desc = _encode_column(kind, col)
            blobs.append(data)
            descs.append(desc)
        slots.append(descs)
    return {
        "id": device.id,
        "boot": model.boot,
        "messages": len(times),
        "sha256": digest.hexdigest(),
        "templates": list(skeletons),
        "t": [len(times), t_width],
        "skel": [len(skel_ids), s_width],
        "slots": slots,
        "blobs": blobs,
    }


def record(
    path: Path,
    *,
    beds: int = DEFAULT_BEDS,
    scenario: str = "mix",
    seed: int = DEFAULT_SEED,
    duration_s: int = DEFAULT_DURATION_S,
    start_ms: int = DEFAULT_START_MS,
    workers: int | None = None,
) -> TraceInfo:
    """Play `plan_fleet(beds, scenario, seed=seed)` for `duration_s` scenario seconds into a trace file."""
    specs = plan_fleet(beds, scenario, seed=seed)
    devices = [SimDevice.from_spec(s, "") for s in specs]
    jobs = [(d, seed, start_ms, duration_s) for d in devices]
    workers = workers or os.cpu_count() or 1
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            encoded = list(pool.map(_encode_device, jobs))
    else:
        encoded = [_encode_device(j) for j in jobs]

    templates: dict[str, int] = {}
    body: list[bytes] = []
    header_devices = []
    content = hashlib.sha256()
    for spec, enc in zip(specs, encoded, strict=True):
        to_global = [templates.setdefault(t, len(templates)) for t in enc["templates"]]
        blobs = enc["blobs"]
        skel_local = itertools.accumulate(_decode_ints(blobs[1], enc["skel"][1]))
        blobs[1], enc["skel"][1] = _int_column([to_global[s] for s in skel_local])
        sizes = [len(b) for b in blobs]
        body += blobs
        content.update(bytes.fromhex(enc["sha256"]))
        header_devices.append(
            {
                "spec": asdict(spec),
                "boot": enc["boot"],
                "messages": enc["messages"],
                "sha256": enc["sha256"],
                "t": enc["t"],
                "skel": enc["skel"],
                "skeletons": [[to_global[i], slots] for i, slots in enumerate(enc["slots"])],
                "sizes": sizes,
            }
        )
    header = {
        "format": FORMAT,
        "generator": "devices.messages.messages_at over devices.fleet.plan_fleet",
        "seed": seed,
        "beds": beds,
        "scenario": scenario,
        "start_ms": start_ms,
        "duration_s": duration_s,
        "messages": sum(d["messages"] for d in header_devices),
        "content_sha256": content.hexdigest(),
        "templates": [json.loads(t) for t in templates],
        "devices": header_devices,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    raw = MAGIC + len(head).to_bytes(8, "little") + head + b"".join(body)
    packed = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(packed)
    tmp.replace(path)
    return _info(header)


# ---- read -----------------------------------------------------------------------------------------------


def _decode_ints(data: bytes, width: int) -> array[int]:
    arr = array(dict((w, c) for c, w in _WIDTHS)[width])
    arr.frombytes(data)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr


def _column(data: bytes, desc: list[Any]) -> Iterator[Any]:
    """The values of one column, lazily (deltas are summed as they are read)."""
    _count, width, decimals = desc
    if decimals is None:
        arr = array("d")
        arr.frombytes(data)
        if sys.byteorder == "big":
            arr.byteswap()
        return iter(arr)
    ints = itertools.accumulate(_decode_ints(data, width))
    if decimals == -1:
        return ints
    p = 10**decimals
    return (m / p for m in ints)


Builder = Callable[[tuple[Any, ...], tuple[int, str, str]], Any]


def _compile(node: Any, counter: list[int]) -> Builder:
    """A function (slot values, (seq, boot, ts)) -> payload for one template."""
    if isinstance(node, dict):
        parts = [(k, _compile(v, counter)) for k, v in node.items()]
        return lambda row, head: {k: b(row, head) for k, b in parts}
    if isinstance(node, list):
        items = [_compile(v, counter) for v in node]
        return lambda row, head: [b(row, head) for b in items]
    if node in (_INT, _FLOAT):
        i = counter[0]
        counter[0] += 1
        return lambda row, head: row[i]
    if node == _SEQ:
        return lambda row, head: head[0]
    if node == _BOOT:
        return lambda row, head: head[1]
    if node == _TS:
        return lambda row, head: head[2]
    return lambda row, head: node


class Trace:
    """A trace file opened for reading (decompressed in memory: tens of MB for the committed one)."""

    def __init__(self, path: Path) -> None:
        raw = lzma.decompress(Path(path).read_bytes(), format=lzma.FORMAT_XZ)
        if not raw.startswith(MAGIC):
            raise ValueError(f"{path}: not a Vigil trace")
        size = int.from_bytes(raw[len(MAGIC) : len(MAGIC) + 8], "little")
        start = len(MAGIC) + 8
        self.header: dict[str, Any] = json.loads(raw[start : start + size])
        if self.header.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.header.get('format')!r}, expected {FORMAT}")
        self._body = memoryview(raw)[start + size :]
        self._offsets = list(
            itertools.accumulate((sum(d["sizes"]) for d in self.header["devices"]), initial=0)
        )
        self._builders = [(kind, _compile(template, [0])) for kind, template in self.header["templates"]]
        self.info = _info(self.header)

    def device_ids(self) -> list[str]:
        return [d["spec"]["id"] for d in self.header["devices"]]

    def device(self, device_id: str) -> Iterator[TraceMessage]:
        """One device's messages in order."""
        for i, d in enumerate(self.header["devices"]):
            if d["spec"]["id"] == device_id:
                return self._device(i)
        raise KeyError(device_id)

    def timeline(self, device_id: str) -> Iterator[tuple[int, str]]:
        """(t_ms, kind) of one device's messages, without building payloads: for counts and coverage."""
        index = self.device_ids().index(device_id)
        d = self.header["devices"][index]
        pos = self._offsets[index]
        t_size, s_size = d["sizes"][0], d["sizes"][1]
        times = _decode_ints(bytes(self._body[pos : pos + t_size]), d["t"][1])
        skel = _decode_ints(bytes(self._body[pos + t_size : pos + t_size + s_size]), d["skel"][1])
        kinds = [kind for kind, _ in self.header["templates"]]
        for n, sid in zip(itertools.accumulate(times), itertools.accumulate(skel), strict=True):
            yield n * 1000, kinds[sid]

    def _device(self, index: int) -> Iterator[TraceMessage]:
        d = self.header["devices"][index]
        blobs: list[bytes] = []
        pos = self._offsets[index]
        for size in d["sizes"]:
            blobs.append(bytes(self._body[pos : pos + size]))
            pos += size
        device_id, boot, start_ms = d["spec"]["id"], d["boot"], self.header["start_ms"]
        times = itertools.accumulate(_decode_ints(blobs[0], d["t"][1]))
        skel = itertools.accumulate(_decode_ints(blobs[1], d["skel"][1]))
        rows: dict[int, Iterator[tuple[Any, ...]]] = {}
        k = 2
        for sid, descs in d["skeletons"]:
            cols = [_column(blobs[k + j], desc) for j, desc in enumerate(descs)]
            k += len(descs)
            rows[sid] = zip(*cols, strict=False) if cols else itertools.repeat(())
        builders = self._builders
        for n, sid in zip(times, skel, strict=True):
            kind, build = builders[sid]
            head = (n + 1, boot, _ts(start_ms + n * 1000))
            yield n * 1000, device_id, kind, build(next(rows[sid]), head)

    def messages(self, devices: Iterable[str] | None = None) -> Iterator[TraceMessage]:
        """Every message (or those of `devices`) in time order; within a second, in fleet order."""
        wanted = None if devices is None else set(devices)
        streams = [
            self._device(i)
            for i, d in enumerate(self.header["devices"])
            if wanted is None or d["spec"]["id"] in wanted
        ]
        return heapq.merge(*streams, key=lambda m: m[0])

    def verify(self, every: int = 1) -> None:
        """Decode every device (or every `every`-th: a quicker check of the decoder; the file's own checksum
        covers its bytes) and check its content digest; a ValueError names the first that differs."""
        total = hashlib.sha256()
        for i, d in enumerate(self.header["devices"]):
            if i % every:
                continue
            h = hashlib.sha256()
            for m in self._device(i):
                _message_digest(h, *m)
            if h.hexdigest() != d["sha256"]:
                raise ValueError(f"device {d['spec']['id']}: content digest differs")
            total.update(h.digest())
        if every == 1 and total.hexdigest() != self.header["content_sha256"]:
            raise ValueError("trace content digest differs")


@lru_cache(maxsize=8192)
def _ts(ms: int) -> str:
    return rfc3339(ms)


def _info(header: dict[str, Any]) -> TraceInfo:
    return TraceInfo(
        seed=header["seed"],
        beds=header["beds"],
        scenario=header["scenario"],
        start_ms=header["start_ms"],
        duration_s=header["duration_s"],
        messages=header["messages"],
        content_sha256=header["content_sha256"],
        devices=tuple(DeviceSpec(**d["spec"]) for d in header["devices"]),
    )


def read(path: Path = DEFAULT_PATH, devices: Iterable[str] | None = None) -> Iterator[TraceMessage]:
    """(t_ms, device_id, kind, payload) in time order; t_ms is scenario time (add `start_ms` for epoch)."""
    return Trace(path).messages(devices)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
