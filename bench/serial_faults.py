#!/usr/bin/env python3
"""Serial fault scenarios over pseudo-terminals, through the real gateway stack.

A tag receiver simulator talks to the gateway over a pty while the wire flips
bits and drops bytes in both directions; a spoofing tag (wrong key) and a
replaying tag (old beacons sent again) mix in; half-way, the receiver's USB
cable is pulled and plugged back. Afterwards every event the simulator
generated is looked up in the gateway's store (the scenario is
:mod:`lab.serial_faults`; this is its command line):

    python bench/serial_faults.py --json

prints one JSON object as its last line with ``events_sent``,
``events_committed_once``, ``events_lost``, ``events_duplicated``,
``events_corrupted``, ``spoof_sent``, ``spoof_rejected``, ``replug_recovery_s``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab.serial_faults import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--ber", type=float, default=1e-3, help="bit errors per byte")
    parser.add_argument("--drop", type=float, default=0.01, help="dropped bytes per byte")
    parser.add_argument("--garbage", type=float, default=0.01,
                        help="probability per write of a burst of random bytes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    print(f"serial faults: {args.events} beacons, bit errors {args.ber}/byte, drops "
          f"{args.drop}/byte, garbage bursts {args.garbage}/write, spoofing and replaying "
          f"tags, a reboot and an unplug mid-stream", file=sys.stderr)
    out = run(args.events, bit_error_rate=args.ber, drop_rate=args.drop,
              garbage_rate=args.garbage, seed=args.seed)
    ok = (out["events_lost"] == out["events_duplicated"] == out["events_corrupted"] == 0
          and out["spoof_rejected"] == out["spoof_sent"])
    print(f"sent {out['events_sent']}, committed once {out['events_committed_once']}, lost "
          f"{out['events_lost']}, duplicated {out['events_duplicated']}, corrupted "
          f"{out['events_corrupted']}; spoofs rejected {out['spoof_rejected']}/"
          f"{out['spoof_sent']}; replug recovery {out['replug_recovery_s']} s -> "
          f"{'OK' if ok else 'PROBLEM'}")
    if args.json:
        print(json.dumps(out, sort_keys=True))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
