"""kill -9 loop (short): the real gateway process SIGKILLed at seeded random moments; an
acked beacon counts as delivered when a verified ``tag.interval`` covers its counter.

The long run is ``python bench/crash.py --kills 200 --json``.
"""

from __future__ import annotations

import pytest

from lab import crash_loop

pytestmark = pytest.mark.slow


# each kill waits for the gateway to be at work (a start on a swtpm takes seconds here)
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("seed", "suite"), [(3, "ed25519"), (11, "sm")])
def test_sigkill_loses_nothing_acked_and_corrupts_nothing(seed: int, suite: str) -> None:
    """On a swtpm-held identity (the TPM outlives every kill), in both suites."""
    res = crash_loop.run(kills=4, seed=seed, rate=60.0, min_up_s=0.4, max_up_s=1.5,
                         suite=suite, acked_before_kill=2)
    assert res.extra["key_class"] == "tpm"
    assert res.extra["suite"] == suite
    assert res.kills == 4
    assert res.records_acked_to_devices > 20
    assert res.records_lost == 0
    assert res.bad_signatures == 0
    assert res.unexplained_gaps == 0
    assert res.duplicates_after_dedupe == 0
    assert res.store_corruptions == 0
    # presence goes out as intervals: the one each kill left open is sealed at the next
    # start from the ledger ("recovered"), and every acked beacon is covered (lost == 0)
    assert res.extra["intervals_recovered"] >= 1
