"""Record chains without a gateway: for tests and benchmarks of sealing and verification.

A :class:`Chain` is what the store writer does at each start, by hand: an identity key,
a sealer, a ``key.session`` record certifying a session key, then records signed by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from buffer.seal import Sealer
from central.record import Registration
from core.head import make_head
from core.record import GENESIS_PREV, JSON, Reading, SealedRecord, Source, Timestamp, b64u
from core.session import SESSION_KIND, SESSION_LIFETIME_MS, rotation_body, session_body
from core.suites import SUITES, Signer, SoftwareKey, key_id

GATEWAY_SOURCE = Source("gateway", "gw-test-0001", "0.1.0")


@dataclass
class Chain:
    """One gateway's chain: ``identity`` certifies sessions, ``sealer`` seals records."""

    gateway_id: str = "gw-test-0001"
    suite: str = "ed25519"
    identity: SoftwareKey | None = None
    boot: int = 1
    sealer: Sealer = field(init=False)
    session: Signer | None = None

    def __post_init__(self) -> None:
        self.identity = self.identity or SoftwareKey.generate(SUITES[self.suite].identity_algs[0])
        self.sealer = Sealer(self.gateway_id, last_seq=0, last_digest=GENESIS_PREV,
                             boot=self.boot)

    @property
    def key(self) -> SoftwareKey:
        """The identity key (made in __post_init__ when not given)."""
        if self.identity is None:
            raise RuntimeError("Chain.identity is made in __post_init__")
        return self.identity

    @property
    def registration(self) -> Registration:
        key = self.key
        return Registration(self.gateway_id, key.alg, key.public_raw,
                            key_id(key.alg, key.public_raw), "file", self.suite)

    def start_session(self, ts: Timestamp, *, session: Signer | None = None,
                      certifier: Signer | None = None, identity_class: str = "file",
                      lifetime_ms: int = SESSION_LIFETIME_MS) -> SealedRecord:
        """Seal a ``key.session`` record: a new session key (or *session*) certified by
        the identity (or *certifier*); every later record is signed by it."""
        session = session or SoftwareKey.generate(SUITES[self.suite].alg)
        certifier = certifier or self.key
        draft = self.sealer.draft()
        body = session_body(gateway_id=self.gateway_id, session=session, boot=draft.boot,
                            from_seq=draft.last_seq + 1, until_mono=ts.mono_ms + lifetime_ms,
                            identity=certifier, identity_class=identity_class)
        draft.use_key(session)
        rec = draft.seal(Reading(SESSION_KIND, self.source, body, ts.mono_ms * 1_000_000), ts)
        self.sealer.advance(draft)
        self.session = session
        return rec

    def rotate_identity(self, ts: Timestamp, new: SoftwareKey) -> SealedRecord:
        """Seal a ``key.rotate`` certifying *new*; later sessions are certified by it."""
        body = rotation_body(gateway_id=self.gateway_id, new=new, new_class="file",
                             from_seq=self.sealer.last_seq + 1, current=self.key,
                             current_class="file")
        rec = self.seal("key.rotate", body, ts)
        self.identity = new
        return rec

    @property
    def source(self) -> Source:
        return Source("gateway", self.gateway_id, "0.1.0")

    def forge(self, key: Signer, kind: str, body: dict[str, JSON],
              ts: Timestamp) -> SealedRecord:
        """A record at this chain's next seq signed by *key* instead of its session key
        (another gateway's, a superseded one); the chain does not move."""
        draft = self.sealer.draft()
        draft.use_key(key)
        return draft.seal(Reading(kind, self.source, body, ts.mono_ms * 1_000_000), ts)

    def seal(self, kind: str, body: dict[str, JSON], ts: Timestamp,
             source: Source | None = None) -> SealedRecord:
        return self.sealer.seal(Reading(kind, source or self.source, body,
                                        ts.mono_ms * 1_000_000), ts)


    def message(self, lines: list[bytes], *, mono_ms: int = 0,
                committed_seq: int | None = None) -> bytes:
        """A records message as the gateway's uplink sends it: *lines*, then the head
        statement (core/head.py) signed by the session key, covering them, announcing
        *committed_seq* (default: the chain's last seq)."""
        if self.session is None:
            raise RuntimeError("Chain.message: start_session first")
        before = b"\n".join(lines) + b"\n"
        seq = self.sealer.last_seq if committed_seq is None else committed_seq
        return before + make_head(self.gateway_id, self.sealer.boot, seq, mono_ms,
                                  self.session, before=before)


def raw_public(key: Signer) -> str:
    return b64u(key.public_raw)
