#!/usr/bin/env python3
"""TPM signing rate and unseal time through provisioning/tpm.py, against a swtpm.

For each algorithm the TPM supports: signatures per second (one key, sequential, as the
store writer would sign), their latency, and the time to unseal a 32-byte storage key;
also the time to open the TPM (it derives the SRK) and to load a key.

    python bench/tpm.py [--seconds 3] [--json]

With ``--json`` the human report goes to stderr and the last stdout line is one JSON
object: ``open_ms``, ``unseal_ms`` (median), and per alg ``sign_per_s``,
``sign_ms_p50``, ``sign_ms_p99``, ``load_ms``.

swtpm runs the TPM in software on this CPU and answers over loopback TCP: it is far
faster than a discrete TPM on SPI, so these figures say what the Python and TSS layers
cost, not what the gateway will get. A real SPI TPM on the gateway's board is not
measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab.swtpm import Swtpm  # noqa: E402
from provisioning.tpm import ALGS, open_tpm  # noqa: E402

UNSEALS = 50
STORAGE_KEY = bytes(range(32))
#: Published figures for real TPMs (not measured here): "single digit signatures per
#: second on most systems" for ECDSA P-256 on PC TPMs, and Chrome's field study with a
#: 200 ms median / 600 ms p95 signature latency (https://stiankri.substack.com/p/tpm-performance).
REAL_TPM_NOTE = ("swtpm is far faster than a real TPM: published ECDSA P-256 figures for PC "
                 "TPMs are single-digit signatures/s (Chrome's field study: 200 ms median, "
                 "600 ms p95 per signature; https://stiankri.substack.com/p/tpm-performance). "
                 "A discrete SPI TPM on the gateway's board: not measured here.")


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def bench(tcti: str, seconds: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    tpm = open_tpm(tcti)
    results: dict[str, Any] = {"open_ms": ms(time.perf_counter() - t0)}
    with tpm:
        sealed = tpm.seal(STORAGE_KEY)
        unseals = []
        for _ in range(UNSEALS):
            t = time.perf_counter()
            tpm.unseal(sealed)
            unseals.append(time.perf_counter() - t)
        results["unseal_ms"] = ms(statistics.median(unseals))
        algs: dict[str, Any] = {}
        for alg in ALGS:
            if not tpm.supports(alg):
                algs[alg] = None
                continue
            blob = tpm.create_signing_key(alg)
            t = time.perf_counter()
            signer = tpm.load_signing_key(blob)
            load_s = time.perf_counter() - t
            latencies = []
            start = time.perf_counter()
            n = 0
            while time.perf_counter() - start < seconds:
                t = time.perf_counter()
                signer.sign(f"record {n}".encode())
                latencies.append(time.perf_counter() - t)
                n += 1
            elapsed = time.perf_counter() - start
            latencies.sort()
            algs[alg] = {"sign_per_s": round(n / elapsed, 1),
                         "sign_ms_p50": ms(latencies[len(latencies) // 2]),
                         "sign_ms_p99": ms(latencies[int(len(latencies) * 0.99)]),
                         "load_ms": ms(load_s), "signatures": n}
        results["algs"] = algs
    return results


def report(results: dict[str, Any], tcti: str) -> str:
    lines = [f"TPM bench against swtpm ({tcti})",
             f"  open (derive the SRK): {results['open_ms']} ms",
             f"  unseal a 32-byte key:  {results['unseal_ms']} ms (median of {UNSEALS})"]
    for alg, figures in results["algs"].items():
        if figures is None:
            lines.append(f"  {alg}: not supported by this TPM")
            continue
        lines.append(f"  {alg}: {figures['sign_per_s']} signatures/s, p50 "
                     f"{figures['sign_ms_p50']} ms, p99 {figures['sign_ms_p99']} ms; "
                     f"load {figures['load_ms']} ms")
    lines.append(f"  note: {REAL_TPM_NOTE}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="signing time per alg")
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-tpm-") as state, Swtpm(Path(state)) as sw:
        results = bench(sw.tcti, args.seconds)
        text = report(results, sw.tcti)
    results["note"] = REAL_TPM_NOTE
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
