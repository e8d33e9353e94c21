#!/usr/bin/env python3
"""Serial fault scenarios over pseudo-terminals, through the real gateway stack.

A tag receiver simulator talks to the gateway over a pty while the wire flips
bits and drops bytes in both directions; a spoofing tag (wrong key) and a
replaying tag (old beacons sent again) mix in; half-way, the receiver's USB
cable is pulled and plugged back. Afterwards every event the simulator
generated is looked up in the gateway's store (the scenario is
:mod:`lab.serial_faults`; this is its command line):

    python bench/serial_faults.py --json [--protocol 1|2|both]

prints one JSON object as its last line with ``events_sent``,
``events_committed_once``, ``events_lost``, ``events_duplicated``,
``events_corrupted``, ``spoof_sent``, ``spoof_rejected``, ``replug_recovery_s``. With
``--protocol both`` (the default) the scenario runs with a device of version 1
(stop-and-wait) and one of version 2 with the WINDOW feature; the top-level figures are
their sums (``replug_recovery_s`` the longer) and ``runs`` holds each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from firmware_bridge.device import WINDOW_DEFAULT  # noqa: E402
from lab.serial_faults import run  # noqa: E402

_SUMMED = ("events_sent", "events_acked", "events_committed_once", "events_lost",
           "events_duplicated", "events_corrupted", "spoof_sent", "spoof_rejected")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--ber", type=float, default=1e-3, help="bit errors per byte")
    parser.add_argument("--drop", type=float, default=0.01, help="dropped bytes per byte")
    parser.add_argument("--garbage", type=float, default=0.01,
                        help="probability per write of a burst of random bytes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--protocol", choices=("1", "2", "both"), default="both",
                        help="the device's protocol: 1 (stop-and-wait), 2 (with the WINDOW "
                             "feature), or both in turn (default)")
    parser.add_argument("--window", type=int, default=WINDOW_DEFAULT,
                        help=f"the window of the version-2 device (default {WINDOW_DEFAULT})")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    print(f"serial faults: {args.events} beacons, bit errors {args.ber}/byte, drops "
          f"{args.drop}/byte, garbage bursts {args.garbage}/write, spoofing and replaying "
          f"tags, a reboot and an unplug mid-stream", file=sys.stderr)
    protocols = (1, 2) if args.protocol == "both" else (int(args.protocol),)
    runs = {}
    for protocol in protocols:
        runs[f"v{protocol}"] = res = run(
            args.events, bit_error_rate=args.ber, drop_rate=args.drop,
            garbage_rate=args.garbage, seed=args.seed, protocol=protocol,
            window=args.window if protocol == 2 else 0)
        print(f"  protocol {protocol}: lost {res['events_lost']}, duplicated "
              f"{res['events_duplicated']}, corrupted {res['events_corrupted']} in "
              f"{res['duration_s']} s", file=sys.stderr)
    if len(runs) == 1:
        out = dict(next(iter(runs.values())))
    else:
        out = {key: sum(r[key] for r in runs.values()) for key in _SUMMED}
        recoveries = [r["replug_recovery_s"] for r in runs.values()]
        out["replug_recovery_s"] = (None if None in recoveries
                                    else max(r for r in recoveries if r is not None))
        out["completed"] = all(r["completed"] for r in runs.values())
        out["runs"] = runs
    ok = (out["events_lost"] == out["events_duplicated"] == out["events_corrupted"] == 0
          and out["spoof_rejected"] == out["spoof_sent"] and bool(out["completed"]))
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
