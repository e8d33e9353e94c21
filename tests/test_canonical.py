"""Canonical bytes with orjson (core/record.py) are the documented canonical bytes, byte
for byte: over any JSON value, adversarial strings, integers at the range limits, every
record kind sealed by buffer/seal.py. Three encoders agree: the fast one (orjson with its
fallbacks), the json module's (``canonical_reference``, the encoder used before) and a
small one written here from docs/records.md's rules alone (:func:`spec`)."""

from __future__ import annotations

import collections
import enum
import hashlib
import json
import math
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buffer.seal import Sealer
from core.kinds import KIND_PRIORITY
from core.record import (
    GENESIS_PREV,
    MAX_INT,
    MIN_INT,
    Reading,
    Source,
    Timestamp,
    b64u,
    canonical,
    canonical_body,
    canonical_reference,
    parse_canonical,
)
from core.suites import ED25519, SoftwareKey, Verifier

ROOT = Path(__file__).resolve().parent.parent
KEY = SoftwareKey(ED25519, bytes(range(32)))
VERIFY = Verifier(ED25519, KEY.public_raw)

# -- the definition, written from docs/records.md ("Canonical bytes") alone ---------------

_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b",
          "\f": "\\f"}


def _spec_string(text: str) -> str:
    out = []
    for char in text:
        if char in _SHORT:
            out.append(_SHORT[char])
        elif ord(char) < 0x20:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _spec_text(value: Any) -> str:  # noqa: PLR0911 (one return per JSON type)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, str):
        return _spec_string(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_spec_text(v) for v in value) + "]"
    if isinstance(value, dict):
        members = sorted(value.items())  # str comparison: by code points
        return "{" + ",".join(_spec_string(k) + ":" + _spec_text(v) for k, v in members) + "}"
    raise TypeError(f"no JSON value: {value!r}")


def spec(value: Any) -> bytes:
    return _spec_text(value).encode("utf-8")  # a lone surrogate: UnicodeEncodeError


# -- values --------------------------------------------------------------------------------

#: Characters the rules single out, and their neighbours.
SPECIAL = [chr(c) for c in range(0x20)] + [
    '"', "\\", "/", "\x7f", "\x80", "\xa0", "\xe9", "\u2028", "\u2029", "\ufeff", "\ufffd",
    "\uffff", "\U00010000", "\U0001f600", "\U0010ffff", "u", "0", "{", "}", ":", ",",
]
#: Texts that look like what the rules forbid, or like what the float check looks for.
TRICKY = ["\\u0041", "\\/", "null", "1.0", "1e5", "1E5", "0e0", "NaN", "Infinity", "-0",
          "true", '","sig":"', "1.2.0", "e+", "A" * 1000]
chars = st.one_of(st.characters(codec="utf-8"), st.sampled_from(SPECIAL))
texts = st.one_of(st.text(chars, max_size=40), st.sampled_from(TRICKY),
                  st.lists(st.sampled_from(SPECIAL + TRICKY), max_size=8).map("".join))
LIMITS = [0, 1, -1, MAX_INT, MIN_INT, MAX_INT - 1, MIN_INT + 1, 2**53, 2**53 + 1, -(2**53) - 1,
          2**31, -(2**31) - 1, 2**32]
#: Beyond the signed 64-bit range (the platform refuses them; sealing writes them as the
#: json module did: both encoders must still agree).
BEYOND = [MAX_INT + 1, 2**64 - 1, 2**64, MIN_INT - 1, 10**30, -(10**30)]
ints = st.one_of(st.integers(MIN_INT, MAX_INT), st.sampled_from(LIMITS))
scalars = st.one_of(st.none(), st.booleans(), ints, texts)


def json_values(leaves: st.SearchStrategy[Any] = scalars) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: st.one_of(st.lists(inner, max_size=5),
                                st.dictionaries(texts, inner, max_size=6)),
        max_leaves=30)


objects = st.dictionaries(texts, json_values(), max_size=8)


def three(value: Any) -> bytes:
    """The value's canonical bytes, after checking the three encoders agree."""
    fast = canonical(value)
    assert fast == canonical_reference(value)
    assert fast == spec(value)
    return fast


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(json_values())
def test_any_json_value_has_the_same_bytes_from_the_three_encoders(value: Any) -> None:
    out = three(value)
    assert json.loads(out) == value or isinstance(value, tuple)


@given(objects)
def test_a_body_is_encoded_as_the_reference_encodes_it(body: dict[str, Any]) -> None:
    assert canonical_body(body) == canonical_reference(body) == spec(body)


@pytest.mark.parametrize("value", LIMITS + BEYOND)
def test_integers_at_and_beyond_the_range_limits(value: int) -> None:
    assert three({"n": value, "l": [value, -value]}) == spec({"n": value, "l": [value, -value]})


@pytest.mark.parametrize("char", SPECIAL + [chr(c) for c in range(0x7f, 0x100)])
def test_each_special_character_alone_and_in_a_key(char: str) -> None:
    three({char: char, "k" + char: [char * 3]})


def test_the_documented_vectors() -> None:
    cases = json.loads((ROOT / "docs/test-vectors/canonical.json").read_text("utf-8"))["cases"]
    checked = 0
    for case in cases:
        if "canonical_hex" in case and "value" in case:
            try:
                expected = bytes.fromhex(case["canonical_hex"])
                if json.loads(expected) != case["value"]:
                    continue  # a vector of bytes that parse to another value (a refusal)
            except ValueError:
                continue
            assert canonical(case["value"]) == expected, case["name"]
            checked += 1
    assert checked >= 3


def test_very_long_strings_and_deep_nesting() -> None:
    long_text = ("\u2028\"\\/\x01\x7f\U0001f600é" * 20_000) + "end"
    three({"s": long_text, long_text: 1})
    deep: Any = "bottom"
    for i in range(300):  # past orjson's depth limit (255): the reference writes it
        deep = [deep] if i % 2 else {"d": deep}
    three({"deep": deep})


def test_key_order_beyond_the_bmp_is_by_code_point() -> None:
    # UTF-16 code units would put U+1F600 (d83d de00) before U+FFFF: code points do not
    out = three({"\U0001f600": 1, "\uffff": 2, "\ud7ff": 3, "\ue000": 4, "a": 5})
    assert out.index("\uffff".encode()) < out.index("\U0001f600".encode())


def test_python_types_the_json_module_writes_as_json() -> None:
    class Level(enum.IntEnum):
        HIGH = 3

    class Name(enum.StrEnum):
        A = "a\n"

    class Items(list[int]):
        pass

    value = {"int_enum": Level.HIGH, "str_enum": Name.A, "tuple": (1, "x"),
             "ordered": collections.OrderedDict([("b", 1), ("a", 2)]), "list": Items([1, 2]),
             "true": True}
    assert canonical(value) == canonical_reference(value)


def test_non_string_keys_as_the_json_module_writes_them() -> None:
    assert canonical({1: "a", 2: "b"}) == b'{"1":"a","2":"b"}'
    for value in ({True: 1, False: 2}, {1.5: "k"}, {"o": {None: 1}}):
        assert canonical(value) == canonical_reference(value)  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # an int and a str cannot be sorted together
        canonical({1: "a", "b": 2})


def test_what_orjson_writes_that_the_reference_refuses() -> None:
    """The one documented difference (core.record.canonical): an Enum member and a UUID.
    The bytes are still the canonical bytes of the JSON value written."""

    class Colour(enum.Enum):
        RED = "red"

    with pytest.raises(TypeError):
        canonical_reference({"c": Colour.RED})
    assert canonical({"c": Colour.RED}) == canonical_reference({"c": "red"})
    u = uuid.UUID(int=7)
    assert canonical({"u": u}) == canonical_reference({"u": str(u)})


@pytest.mark.parametrize("value", [object(), b"bytes", {1, 2}, Path("x"), 1j])
def test_values_json_cannot_hold_are_refused(value: object) -> None:
    with pytest.raises(TypeError):
        canonical_reference({"x": value})
    with pytest.raises(TypeError):
        canonical({"x": value})
    with pytest.raises(TypeError):
        canonical_body({"x": value})


# -- floats: never in a record ---------------------------------------------------------------

floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                   st.sampled_from([0.0, -0.0, 1.0, 1e16, 1e22, 5e-324, 1e300, 2.0**63]))


def _with_leaf_at(value: Any, leaf: Any, choice: int) -> tuple[Any, str]:
    """*value* with *leaf* put somewhere (by *choice*), and the path check_no_float names."""
    if isinstance(value, dict) and value:
        key = sorted(value)[choice % len(value)]
        inner, path = _with_leaf_at(value[key], leaf, choice // 2)
        return {**value, key: inner}, f".{key}{path}"
    if isinstance(value, list) and value:
        index = choice % len(value)
        inner, path = _with_leaf_at(value[index], leaf, choice // 2)
        return [*value[:index], inner, *value[index + 1:]], f"[{index}]{path}"
    return leaf, ""


@settings(max_examples=300)
@given(objects, floats, st.integers(0, 10**6))
def test_a_float_anywhere_in_a_body_is_refused_naming_where(
        body: dict[str, Any], number: float, choice: int) -> None:
    body, path = _with_leaf_at({"a": body}, number, choice)
    with pytest.raises(TypeError, match="float at body"):
        canonical_body(body)
    # canonical() keeps the json module's behaviour: it writes a finite float as Python does
    assert canonical(body) == canonical_reference(body)
    assert path


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_nan_and_infinities_are_refused_though_orjson_writes_null(number: float) -> None:
    body = {"a": [1, {"b": number}], "none": None}
    with pytest.raises(TypeError, match=r"float at body\.a\[1\]\.b"):
        canonical_body(body)
    with pytest.raises(ValueError, match="Out of range float"):
        canonical(body)


def test_a_float_among_strings_that_look_like_floats() -> None:
    body = {"v": "1.2.0", "w": "1e5", "n": None, "x": [1, 2, 3.5]}
    with pytest.raises(TypeError, match=r"float at body\.x\[2\]"):
        canonical_body(body)
    clean = {"v": "1.2.0", "w": "1e5", "n": None, "x": [1, 2, 3]}
    assert canonical_body(clean) == spec(clean)


@pytest.mark.parametrize("text", ["0E5", "T0000100E", "1.", ".5", "9e", "E9", "null", "NULL",
                                  "nul", "0.0", "-1e-7", "1e+16"])
@pytest.mark.parametrize("in_key", [False, True])
def test_strings_the_float_check_looks_at_twice_are_not_floats(text: str, in_key: bool) -> None:
    """The check on orjson's bytes takes these for a float's text; the walk then finds
    none: the bytes are orjson's, as defined."""
    body: dict[str, Any] = {text: [1, 2]} if in_key else {"s": text, "n": 10}
    assert canonical_body(body) == spec(body) == canonical(body)


@pytest.mark.parametrize("number", [1e16, 1e-7, 0.5, -0.0, 1.5e300, 5e-324, 100.0])
def test_every_form_of_a_float_orjson_writes_is_caught(number: float) -> None:
    """A float alone among integers (no other "." or "null" in the bytes)."""
    body = {"n": 7, "x": number}
    with pytest.raises(TypeError, match=r"float at body\.x"):
        canonical_body(body)


# -- lone surrogates: no encoding ------------------------------------------------------------

surrogates = st.integers(0xD800, 0xDFFF).map(chr)


@given(texts, surrogates, texts, st.booleans())
def test_a_lone_surrogate_is_refused_as_before(before: str, lone: str, after: str,
                                               in_key: bool) -> None:
    text = before + lone + after
    value = {text: 1} if in_key else {"s": [text]}
    with pytest.raises(UnicodeEncodeError):
        canonical_reference(value)
    with pytest.raises(UnicodeEncodeError):
        canonical(value)
    with pytest.raises(UnicodeEncodeError):
        canonical_body(value)


# -- sealed records: every kind --------------------------------------------------------------

gateway_ids = st.from_regex(r"[a-z0-9][a-z0-9-]{2,20}", fullmatch=True)
sources = st.builds(Source, texts, texts, st.one_of(st.none(), texts))
timestamps = st.builds(Timestamp, ints, st.one_of(st.sampled_from(["ntp", "gnss", "rtc",
                                                                   "unsynced"]), texts), ints)


def _schema_bodies() -> dict[str, list[str]]:
    """The body members docs/record.schema.json names for a kind."""
    schema = json.loads((ROOT / "docs/record.schema.json").read_text("utf-8"))
    out: dict[str, list[str]] = {}
    for rule in schema.get("allOf", []):
        kind = rule.get("if", {}).get("properties", {}).get("kind", {}).get("const")
        body = rule.get("then", {}).get("properties", {}).get("body", {})
        if kind:
            out[kind] = sorted(set(body.get("required", [])) | set(body.get("properties", {})))
    return out


SCHEMA_MEMBERS = _schema_bodies()


@st.composite
def kind_and_body(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    kind = draw(st.sampled_from(sorted(KIND_PRIORITY)))
    body = draw(objects)
    for name in SCHEMA_MEMBERS.get(kind, []):
        body[name] = draw(json_values())
    return kind, body


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(gateway_ids, st.integers(1, MAX_INT), st.integers(0, 2**40),
       st.lists(st.tuples(kind_and_body(), sources, timestamps), min_size=1, max_size=4))
def test_every_kind_sealed_is_the_reference_encoding_of_its_record(
        gw: str, boot: int, last_seq: int,
        items: list[tuple[tuple[str, dict[str, Any]], Source, Timestamp]]) -> None:
    last_digest = hashlib.sha256(b"%d" % last_seq).digest() if last_seq else GENESIS_PREV
    sealer = Sealer(gw, KEY, last_seq=last_seq, last_digest=last_digest, boot=boot)
    draft = sealer.draft()
    prev = last_digest
    for (kind, body), src, ts in items:
        record = draft.seal(Reading(kind, src, body, 0), ts)
        expected = {"alg": ED25519, "v": 2, "gw": gw, "seq": record.seq, "prev": b64u(prev),
                    "boot": boot, "t": ts.utc_ms, "tq": ts.quality, "mono": ts.mono_ms,
                    "src": src.to_json(), "kind": kind, "prio": KIND_PRIORITY[kind].label,
                    "body": body, "kid": KEY.kid}
        unsigned = canonical_reference(expected)
        assert unsigned == spec(expected)
        sig = KEY.sign(unsigned)  # Ed25519 is deterministic
        assert record.data == canonical_reference({**expected, "sig": b64u(sig)})
        assert VERIFY.verify(sig, unsigned)
        assert record.digest == hashlib.sha256(record.data).digest()
        assert record.priority == KIND_PRIORITY[kind]
        prev = record.digest
    assert draft.last_seq == last_seq + len(items)


def test_a_draft_sealing_readings_of_several_sources_in_turn() -> None:
    """The draft keeps the last source's bytes (by identity): readings from one source,
    another, the first again and an equal one made anew are each sealed with their own."""
    first = Source("tag_receiver", "TR-1", "1.4.2")
    second = Source("kiosk", "KI-1")
    turns = [first, first, second, first, Source("tag_receiver", "TR-1", "1.4.2"),
             Source("tag_receiver", "TR-2", "1.4.2"), second]
    draft = Sealer("gw-test-0001", KEY, last_seq=0, last_digest=GENESIS_PREV, boot=3).draft()
    prev = GENESIS_PREV
    for n, src in enumerate(turns):
        ts = Timestamp(1_700_000_000_000 + n, "ntp", n)
        record = draft.seal(Reading("tag.presence", src, {"n": n}, 0), ts)
        unsigned = {"alg": ED25519, "v": 2, "gw": "gw-test-0001", "seq": n + 1,
                    "prev": b64u(prev), "boot": 3, "t": ts.utc_ms, "tq": "ntp",
                    "mono": n, "src": src.to_json(), "kind": "tag.presence",
                    "prio": KIND_PRIORITY["tag.presence"].label, "body": {"n": n},
                    "kid": KEY.kid}
        sig = KEY.sign(canonical_reference(unsigned))
        assert record.data == spec({**unsigned, "sig": b64u(sig)})
        prev = record.digest


@given(kind_and_body(), surrogates, st.booleans())
def test_sealing_refuses_a_surrogate_and_a_float_without_moving(
        kb: tuple[str, dict[str, Any]], lone: str, float_not_surrogate: bool) -> None:
    kind, body = kb
    draft = Sealer("gw-test-0001", KEY, last_seq=5, last_digest=GENESIS_PREV, boot=1).draft()
    bad = {**body, "x": 1.5} if float_not_surrogate else {**body, "x": "a" + lone}
    with pytest.raises(TypeError if float_not_surrogate else UnicodeEncodeError):
        draft.seal(Reading(kind, Source("c", "i"), bad, 0), Timestamp(1, "ntp", 1))
    assert (draft.last_seq, draft.last_digest) == (5, GENESIS_PREV)
    with pytest.raises(UnicodeEncodeError):  # in the source: the same
        draft.seal(Reading(kind, Source("c", lone), body, 0), Timestamp(1, "ntp", 1))
    assert draft.seal(Reading(kind, Source("c", "i"), body, 0), Timestamp(1, "ntp", 1)).seq == 6


@pytest.mark.parametrize("ts", [Timestamp(True, "ntp", 1), Timestamp(1, "ntp", 2.5)])  # type: ignore[arg-type]
def test_a_timestamp_that_is_no_integer_is_refused(ts: Timestamp) -> None:
    draft = Sealer("gw-test-0001", KEY, last_seq=0, last_digest=GENESIS_PREV, boot=1).draft()
    with pytest.raises(TypeError):
        draft.seal(Reading("tag.presence", Source("c", "i"), {}, 0), ts)
    assert draft.last_seq == 0


# -- the platform's side: parsing canonical bytes in C -----------------------------------------

def _strict_json(data: bytes) -> Any:
    """The json module's parse, refusing duplicate keys and non-JSON constants."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in items}) != len(items):
            raise ValueError("duplicate key")
        return dict(items)

    def constant(name: str) -> Any:
        raise ValueError(name)

    return json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)


def _is_canonical_record_json(data: bytes) -> bool:
    """What parse_canonical must decide, by the slow definition."""
    try:
        value = _strict_json(data)
        if not isinstance(value, dict) or _has_odd_number(value):
            return False
        return canonical_reference(value) == data
    except (ValueError, RecursionError):
        return False


def _has_odd_number(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not MIN_INT <= value <= MAX_INT
    if isinstance(value, dict):
        return any(_has_odd_number(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_odd_number(v) for v in value)
    return False


#: Edits that turn canonical bytes into others, each refused by the slow definition or not.
EDITS: list[tuple[bytes, bytes]] = [
    (b",", b", "), (b":", b" : "), (b"}", b",}"), (b'"a"', b'"\\u0061"'), (b"/", b"\\/"),
    (b"1", b"1.0"), (b"1", b"1e0"), (b"0", b"-0"), (b"1", b"01"), (b"true", b"True"),
    (b'{"', b'{"a":1,"'), (b"[", b"[ "), (b"9", b"99999999999999999999"), (b"null", b"NaN"),
    (b'"', b'"\\ud800'), (b"e", b"\xc3\xa9"), (b"e", b"\xff"), (b"\\n", b"\n"),
    (b"\\u001f", b"\\u001F"), (b"\\\\", b"\\u005c"),
]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(objects, st.lists(st.tuples(st.sampled_from(EDITS), st.integers(0, 50)), max_size=3))
def test_parse_canonical_takes_exactly_the_canonical_bytes(
        value: dict[str, Any], edits: list[tuple[tuple[bytes, bytes], int]]) -> None:
    data = canonical(value)
    assert parse_canonical(data) == value
    for (old, new), nth in edits:
        at = -1
        for _ in range(nth % (data.count(old) or 1) + 1):
            at = data.find(old, at + 1)
        if at >= 0:
            data = data[:at] + new + data[at + len(old):]
    parsed = parse_canonical(data)
    assert (parsed is not None) == _is_canonical_record_json(data), data
    if parsed is not None:
        assert parsed == _strict_json(data)


@pytest.mark.parametrize("data", [
    b'{"a":1,"a":1}', b'{"a":1.0}', b'{"a":9223372036854775808}', b'{"a":-9223372036854775809}',
    b'{"a":18446744073709551616}', b'{"a":NaN}', b'{"a":"\\ud800"}', b'{"a":"\\u0041"}',
    b' {"a":1}', b'{"a":1}\n', b'\xef\xbb\xbf{"a":1}', b'[1]', b'"a"', b'{"b":1,"a":2}',
])
def test_parse_canonical_refuses(data: bytes) -> None:
    assert parse_canonical(data) is None
