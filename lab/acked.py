"""Count the distinct records the broker acknowledged, in constant memory.

For the demo and the tests: hand an :class:`AckedCounter` to the gateway as its
uplink's ``on_acked`` hook. Within a class the forwarder sends, and the broker
acknowledges, seqs in increasing order, and what is sent again after a
reconnect starts at or below the highest seq already acknowledged; so one
high-water mark per class counts each seq once. (A batch refused by the broker
and accepted after a later batch of its class would be missed: refusals mean a
wrong ACL, where nothing of the topic is accepted.)
"""

from __future__ import annotations

from core.kinds import Priority


class AckedCounter:
    """Called on the uplink thread; :attr:`count` is a plain integer other threads read."""

    def __init__(self) -> None:
        self._high: dict[Priority, int] = {}
        self.count = 0

    def __call__(self, prio: Priority, seqs: list[int]) -> None:
        if not seqs:
            return
        high = self._high.get(prio, 0)
        self.count += sum(1 for seq in seqs if seq > high)
        self._high[prio] = max(high, seqs[-1])
