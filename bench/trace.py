"""Record (or check) the committed simulator trace: a 40-bed ward, scenario mix, seed 0, 24 h (docs/TRACE.md).

    /tmp/v/bin/python bench/trace.py            # record bench/data/ward40-seed0-24h.vtrace.xz, then verify it
    /tmp/v/bin/python bench/trace.py --verify   # only read it back: checksums, counts, read speed

Needs only the `devices` package (no hub, no broker). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devices import trace


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--path", type=Path, default=trace.DEFAULT_PATH)
    parser.add_argument("--beds", type=int, default=trace.DEFAULT_BEDS)
    parser.add_argument("--seed", type=int, default=trace.DEFAULT_SEED)
    parser.add_argument("--duration", type=int, default=trace.DEFAULT_DURATION_S, help="scenario seconds")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: every CPU)")
    parser.add_argument("--verify", action="store_true", help="do not record, only read back")
    args = parser.parse_args()

    out: dict[str, object] = {}
    if not args.verify:
        t0 = time.perf_counter()
        info = trace.record(
            args.path, beds=args.beds, seed=args.seed, duration_s=args.duration, workers=args.workers
        )
        out["record_s"] = round(time.perf_counter() - t0, 1)
        print(f"recorded {info.messages} messages in {out['record_s']} s -> {args.path}")

    t0 = time.perf_counter()
    tr = trace.Trace(args.path)
    out["open_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    kinds: collections.Counter[str] = collections.Counter()
    last = -1
    for t_ms, _device, kind, _payload in tr.messages():
        if t_ms < last:
            raise SystemExit("trace is not in time order")
        last = t_ms
        kinds[kind] += 1
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr.verify()
    out |= {
        "read_s": round(read_s, 1),
        "read_msgs_per_s": round(sum(kinds.values()) / read_s),
        "verify_s": round(time.perf_counter() - t0, 1),
        "messages": sum(kinds.values()),
        "by_kind": dict(sorted(kinds.items())),
        "bytes": args.path.stat().st_size,
        "file_sha256": trace.file_sha256(args.path),
        "content_sha256": tr.info.content_sha256,
        "scenarios": dict(collections.Counter(f"{d.type}:{d.scenario}" for d in tr.info.devices)),
    }
    print(f"read {out['messages']} messages in {out['read_s']} s; content digest verified")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
