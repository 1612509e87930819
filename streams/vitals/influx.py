"""The scaled `VitalsStore`: InfluxDB line protocol (v2: influxdb-client, v1: `/write`) and InfluxQL reads."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal, cast

import aiohttp
import httpx
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException

from streams.ports import VitalPoint

log = logging.getLogger(__name__)

MEASUREMENT = "vitals"
# A point whose ts is further ahead of its received time than this never pins "latest" (contract section 3).
FUTURE_SLACK_MS = 5 * 60_000

# Tag keys in the order they are written (InfluxDB prefers tags sorted by key; it sorts them itself anyway).
_TAGS = ("bed", "code", "device", "patient", "site", "unit")
# The selected columns: the tag `unit` (a hospital unit) and the field `unit` (UCUM) share a name, so every
# column is typed and the ambiguous ones are renamed.
_SELECT = (
    '"value"::field, "unit"::field AS "ucum", "flags"::field, "received_at"::field, "key"::field, '
    '"site"::tag, "unit"::tag AS "unit_id", "bed"::tag, "patient"::tag, "device"::tag, "code"::tag'
)


class StoreUnavailableError(Exception):
    """The store cannot take or answer this request now (down, timing out, overloaded): retry later."""


class StoreRejectedError(Exception):
    """The store refused the content of a write (HTTP 400/413): retrying the same batch will not help."""


def tag_value(s: str) -> str:
    """A tag value as stored: line protocol has no escape for a newline, and InfluxDB 1.x none for a
    backslash before a separator or at the end, so those become a space and U+2216 (reads use the same)."""
    return s.replace("\r", " ").replace("\n", " ").replace("\\", "\u2216")


def _escape_tag(s: str) -> str:
    return tag_value(s).replace(",", r"\,").replace("=", r"\=").replace(" ", r"\ ")


def _escape_field(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_line(p: VitalPoint) -> str | None:
    """One point as a line of line protocol (ms timestamp); None for a value line protocol cannot carry."""
    value = float(p.value)
    if not math.isfinite(value):
        return None
    tags = {
        "bed": p.bed_id,
        "code": p.code,
        "device": p.device_id,
        "patient": p.patient_id,
        "site": p.site_id,
        "unit": p.unit_id,
    }
    tagset = "".join(f",{k}={_escape_tag(v)}" for k in _TAGS if (v := tags[k]))
    fields = (
        f"value={value!r},unit={_escape_field(p.unit)},flags={_escape_field(','.join(p.flags))},"
        f"received_at={int(p.received_at)}i,key={_escape_field(p.key)}"
    )
    return f"{MEASUREMENT}{tagset} {fields} {int(p.ts)}"


def quote_ident(name: str) -> str:
    """An InfluxQL identifier, double-quoted."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def quote_str(value: str) -> str:
    """An InfluxQL string literal, single-quoted, so no value can end the literal early."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _status_error(status: int, body: str, what: str) -> Exception:
    if status in (400, 413):
        return StoreRejectedError(f"{what}: HTTP {status}: {body[:300]}")
    return StoreUnavailableError(f"{what}: HTTP {status}: {body[:300]}")


class InfluxVitalsStore:
    """Vitals in InfluxDB (1.x, 1.8+/2.x/3.x) or VictoriaMetrics; `api` picks the write path."""

    def __init__(
        self,
        url: str,
        *,
        api: Literal["v1", "v2"] = "v2",
        token: str = "",
        org: str = "",
        bucket: str = "vigil",
        db: str = "vigil",
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        if api not in ("v1", "v2"):
            raise ValueError(f"api must be 'v1' or 'v2', not {api!r}")
        self._url = url.rstrip("/")
        self._api = api
        self._token = token
        self._org = org
        self._bucket = bucket
        self._db = db
        self._username = username
        self._password = password
        self._timeout = timeout
        self._http: httpx.AsyncClient | None = None
        self._v2: InfluxDBClientAsync | None = None

    async def start(self) -> None:
        headers = {"Authorization": f"Token {self._token}"} if self._token else {}
        auth = (self._username, self._password or "") if self._username else None
        # One keep-alive client for v1 writes, InfluxQL reads and pings.
        self._http = httpx.AsyncClient(
            base_url=self._url, headers=headers, auth=auth, timeout=httpx.Timeout(self._timeout)
        )
        if self._api == "v2":
            self._v2 = InfluxDBClientAsync(
                url=self._url, token=self._token, org=self._org, timeout=int(self._timeout * 1000)
            )

    async def close(self) -> None:
        if self._v2 is not None:
            await self._v2.close()  # type: ignore[no-untyped-call]
            self._v2 = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("InfluxVitalsStore is not started: call start() first")
        return self._http

    async def write(self, points: Sequence[VitalPoint]) -> None:
        lines: list[str] = []
        for p in points:
            line = to_line(p)
            if line is None:
                # The gateway dead-letters non-finite values; one here is a bug upstream, not a reason to
                # block every later point behind it.
                log.error("vitals point %s has a non-finite value and is not stored", p.key)
                continue
            lines.append(line)
        if not lines:
            return
        body = "\n".join(lines)
        if self._api == "v2":
            await self._write_v2(body)
        else:
            await self._write_v1(body)

    async def _write_v2(self, body: str) -> None:
        if self._v2 is None:
            raise RuntimeError("InfluxVitalsStore is not started: call start() first")
        try:
            # One request per call: the body is already one batch of line protocol.
            await self._v2.write_api().write(
                bucket=self._bucket,
                org=self._org,
                record=body,
                write_precision=cast(WritePrecision, WritePrecision.MS),
            )
        except ApiException as e:
            raise _status_error(int(e.status or 0), str(e.body or e.reason), "influx v2 write") from e
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise StoreUnavailableError(f"influx v2 write: {e!r}") from e

    async def _write_v1(self, body: str) -> None:
        params = {"db": self._db, "precision": "ms"}
        try:
            r = await self._client().post("/write", params=params, content=body.encode())
        except httpx.HTTPError as e:
            raise StoreUnavailableError(f"influx v1 write: {e!r}") from e
        if not 200 <= r.status_code < 300:
            raise _status_error(r.status_code, r.text, "influx v1 write")

    async def _influxql(self, q: str) -> list[dict[str, Any]]:
        """Run one InfluxQL statement on `/query`; answers its series."""
        try:
            r = await self._client().get("/query", params={"db": self._db, "q": q, "epoch": "ms"})
        except httpx.HTTPError as e:
            raise StoreUnavailableError(f"influxql query: {e!r}") from e
        if r.status_code != 200:
            raise StoreUnavailableError(f"influxql query: HTTP {r.status_code}: {r.text[:300]}")
        results = r.json().get("results", [])
        result: dict[str, Any] = results[0] if results else {}
        if "error" in result or "statement_id" not in result:
            raise StoreUnavailableError(f"influxql query: {result.get('error', 'not an InfluxQL answer')}")
        series = list(result.get("series", []))
        if any(s.get("name") != MEASUREMENT for s in series):
            # VictoriaMetrics answers every /query with a made-up database list: an empty trend shown as
            # "no data" would mislead a clinician, so a store that does not speak InfluxQL is an error.
            raise StoreUnavailableError("influxql query: the store does not answer InfluxQL reads")
        return series

    async def query(
        self, *, patient_id: str, code: str, since: int, until: int | None = None, limit: int = 10_000
    ) -> list[VitalPoint]:
        where = (
            f"{quote_ident('patient')} = {quote_str(tag_value(patient_id))}"
            f" AND {quote_ident('code')} = {quote_str(tag_value(code))} AND time >= {int(since)}ms"
        )
        if until is not None:
            where += f" AND time <= {int(until)}ms"
        q = (
            f"SELECT {_SELECT} FROM {quote_ident(MEASUREMENT)} WHERE {where}"
            f" ORDER BY time ASC LIMIT {int(limit)}"
        )
        return [p for series in await self._influxql(q) for p in _points(series)]

    async def latest(self, *, patient_id: str) -> dict[str, VitalPoint]:
        # LIMIT applies per GROUP BY group: one newest row per code. A device clock in the future is
        # bounded by the server's now(); the gateway already stored such points at their received time.
        q = (
            f"SELECT {_SELECT} FROM {quote_ident(MEASUREMENT)}"
            f" WHERE {quote_ident('patient')} = {quote_str(tag_value(patient_id))}"
            f" AND time <= now() + {FUTURE_SLACK_MS}ms"
            f" GROUP BY {quote_ident('code')} ORDER BY time DESC LIMIT 1"
        )
        out: dict[str, VitalPoint] = {}
        for series in await self._influxql(q):
            for p in _points(series):
                if p.ts <= p.received_at + FUTURE_SLACK_MS:
                    out[p.code] = p
        return out

    async def ready(self) -> bool:
        paths = ("/ping",) if self._api == "v1" else ("/health", "/ping")
        for path in paths:
            try:
                r = await self._client().get(path)
            except httpx.HTTPError:
                return False
            if 200 <= r.status_code < 300:
                return True
        return False


def _points(series: dict[str, Any]) -> list[VitalPoint]:
    columns: list[str] = series["columns"]
    tags: dict[str, str] = series.get("tags") or {}
    out = []
    for values in series.get("values") or []:
        row = dict(zip(columns, values, strict=True))
        if row.get("value") is None:
            continue

        def tag(name: str, row: dict[str, Any] = row) -> str | None:
            v = row.get(name) or tags.get(name)
            return str(v) if v else None

        flags = row.get("flags") or ""
        out.append(
            VitalPoint(
                key=str(row.get("key") or ""),
                site_id=tag("site") or "",
                unit_id=tag("unit_id"),
                bed_id=tag("bed"),
                patient_id=tag("patient"),
                device_id=tag("device") or "",
                code=tag("code") or "",
                value=float(row["value"]),
                unit=str(row.get("ucum") or ""),
                ts=int(row["time"]),
                received_at=int(row.get("received_at") or row["time"]),
                flags=tuple(flags.split(",")) if flags else (),
            )
        )
    return out
