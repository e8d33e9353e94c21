#!/usr/bin/env python3
"""Crash benchmark: the real gateway process SIGKILLed at seeded random moments, again and again.

Simulated tags beacon steadily through a tag receiver on a pseudo-terminal; the
gateway (``gateway.py run`` in its own process) reads them, commits and forwards
to a local mosquitto (mTLS); the platform verifier listens throughout. The
gateway is killed with SIGKILL at random moments and restarted each time. At the
end it is left to drain, and we count:

- ``records_acked_to_devices``: beacons the receiver got an ACK for;
- ``records_lost``: acked beacons no verified ``tag.interval`` covers (presence goes out
  as intervals: docs/records.md);
- ``bad_signatures``, ``unexplained_gaps`` (chain gaps no signed gap record covers),
  ``duplicates_after_dedupe`` (a beacon covered by two intervals),
  ``store_corruptions`` (``PRAGMA integrity_check`` of the store after each kill).

    python bench/crash.py --kills 200 --json

The loop is :mod:`lab.crash_loop`; this is its command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab.crash_loop import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=40.0, help="beacons per second")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="gateway logs at info level")
    parser.add_argument("--suite", choices=("ed25519", "sm"), default="ed25519")
    parser.add_argument("--acked-before-kill", type=int, default=3,
                        help="kill a gateway only once the receiver got this many more ACKs "
                             "since its start (0: at the random moment, even mid-start)")
    parser.add_argument("--no-tpm", action="store_true",
                        help="identity and storage keys in files instead of a swtpm")
    args = parser.parse_args(argv)
    res = run(args.kills, args.seed, rate=args.rate, verbose=args.verbose,
              keep=bool(os.environ.get("SMARTCORR_KEEP")), suite=args.suite,
              tpm=not args.no_tpm, acked_before_kill=args.acked_before_kill)
    out = {k: v for k, v in res.__dict__.items() if k != "extra"} | res.extra
    ok = res.records_lost == res.bad_signatures == res.unexplained_gaps == \
        res.duplicates_after_dedupe == res.store_corruptions == 0
    print(f"crash: {res.kills} kills in {res.duration_s}s; {res.records_acked_to_devices} acked, "
          f"{res.records_verified} verified, lost {res.records_lost}, bad signatures "
          f"{res.bad_signatures}, unexplained gaps {res.unexplained_gaps}, duplicates "
          f"{res.duplicates_after_dedupe}, store corruptions {res.store_corruptions} -> "
          f"{'OK' if ok else 'PROBLEM'}")
    if args.json:
        print(json.dumps(out, sort_keys=True))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
