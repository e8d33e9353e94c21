"""Several messages in one transaction (``Ingest.ingest_messages``, what a consumer with a
backlog does): the same outcome as one message at a time, and two consumers taking the
same gateways in opposite orders never wait on each other in a cycle. On SQLite and on
PostgreSQL (the ``db`` / ``db_url`` fixtures)."""

from __future__ import annotations

import threading

import pytest

from central.db import Database, open_db
from central.ingest import Ingest, report
from core.topics import records_topic
from lab.chains import Chain
from tests.helpers import wait_for
from tests.test_ingest import TS, count


def chains(n: int) -> list[Chain]:
    return [Chain(f"gw-batch-{i:04d}") for i in range(n)]


def messages(chain: Chain, n: int, per: int) -> list[tuple[str, bytes]]:
    """*n* messages of *per* records (the first with the key.session) and their heads."""
    out = []
    for m in range(n):
        lines = [chain.start_session(TS).data] if m == 0 else []
        lines += [chain.seal("tag.presence" if i % 7 else "tag.tamper", {"m": m, "i": i},
                             TS).data for i in range(per)]
        out.append((records_topic(chain.gateway_id), chain.message(lines)))
    return out


def test_a_batch_stores_what_its_messages_would_one_by_one(db: Database) -> None:
    a, b = chains(2)
    ingest = Ingest(db, sig_audit=0.0)
    for chain in (a, b):
        ingest.enrol(chain.registration)
    ma, mb = messages(a, 3, 10), messages(b, 3, 10)
    batch = [ma[0], mb[0], ma[1], (records_topic(a.gateway_id), b"garbage"), mb[1], ma[2],
             mb[2], ma[1]]  # interleaved, a bad line, and a redelivery
    results = ingest.ingest_messages(batch)
    assert [r.stored for r in results] == [11, 11, 10, 0, 10, 10, 10, 0]
    assert results[3].quarantined == {"malformed": 1}
    assert results[7].duplicates == 10
    assert sum(r.heads for r in results) == 7
    alarms = [alarm for r in results for alarm in r.alarms]
    assert len(alarms) == len({alarm.id for alarm in alarms}) == 2 + 2 * 3 * 2  # numbered
    for chain in (a, b):
        assert count(db, "records", chain.gateway_id) == 31
        assert report(db, chain.gateway_id)["gaps_unexplained"] == []
        assert report(db, chain.gateway_id)["chain_breaks"] == []


def test_batches_in_opposite_orders_never_deadlock(db_url: str) -> None:
    """Two consumers, each a batch of the same gateways in the opposite order, many times
    over: every record stored once, no deadlock (PostgreSQL would refuse one transaction
    with 'deadlock detected', an error here). The locks are taken in one sorted order
    whatever the batch's (``lock_gateways``); timing decides whether a wrong order shows
    here, so this is the concurrent run's check, not the order's proof."""
    gws = chains(6)
    with open_db(db_url) as db:
        setup = Ingest(db)
        for chain in gws:
            setup.enrol(chain.registration)
    rounds = 8
    per_gw = [messages(chain, rounds, 5) for chain in gws]
    errors: list[BaseException] = []

    def consume(order: list[int]) -> None:
        try:
            with open_db(db_url) as db:
                ingest = Ingest(db, sig_audit=0.0)
                for r in range(rounds):
                    ingest.ingest_messages([per_gw[i][r] for i in order])
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    forward = list(range(len(gws)))
    threads = [threading.Thread(target=consume, args=(order,))
               for order in (forward, forward[::-1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    with open_db(db_url) as db:
        for chain in gws:
            assert count(db, "records", chain.gateway_id) == 1 + rounds * 5


def test_a_busy_gateway_waits_the_others_go_on(db_url: str) -> None:
    """A batch with a gateway whose lock another transaction holds commits the other
    gateways' messages at once, and that gateway's once the lock is free (PostgreSQL's
    advisory locks; SQLite has one writer at a time and nothing to wait for)."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite: one writer at a time, no gateway is ever busy")
    busy, free = chains(2)
    with open_db(db_url) as db:
        setup = Ingest(db)
        for chain in (busy, free):
            setup.enrol(chain.registration)
    batch = [messages(busy, 1, 5)[0], messages(free, 1, 5)[0]]
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with open_db(db_url) as db, db.transaction() as tx:
            tx.lock_gateway(busy.gateway_id)
            holding.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)
    done: list[object] = []

    def ingest() -> None:
        with open_db(db_url) as db:
            done.append(Ingest(db, sig_audit=0.0).ingest_messages(batch))

    worker = threading.Thread(target=ingest)
    worker.start()
    try:
        with open_db(db_url) as db:
            wait_for(lambda: count(db, "records", free.gateway_id) == 6, timeout=30,
                     what="the free gateway's records, while the other is busy")
            assert count(db, "records", busy.gateway_id) == 0
            assert worker.is_alive()  # waiting for the busy gateway's lock
    finally:
        release.set()
        holder.join(30)
        worker.join(30)
    assert done
    with open_db(db_url) as db:
        assert count(db, "records", busy.gateway_id) == 6
