"""docs/test-vectors/commands.json holds for our own code, from the file's data alone: each
valid command is applied (its device key decrypts, every step of the encryption as the
file gives it), each invalid one is refused with its reason (docs/commands.md); every
valid command fits docs/command.schema.json. (tests/test_vectors.py checks that the
generator writes the file byte for byte.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from core.command_keys import CommandKeyring, CommandRoot
from core.commands import (
    BoxKey,
    Command,
    Duplicate,
    Refusal,
    check_command,
    command_digest,
    device_key_aad,
)
from core.record import canonical, unb64u

DIRECTORY = Path(__file__).resolve().parents[1] / "docs"
VECTORS: dict[str, Any] = json.loads(
    (DIRECTORY / "test-vectors" / "commands.json").read_text(encoding="ascii"))
SCHEMA = json.loads((DIRECTORY / "command.schema.json").read_text())


def keyring() -> CommandKeyring:
    ring = VECTORS["keyring"]
    held = CommandKeyring(CommandRoot.from_bytes(canonical(ring["root"])))
    held.add_revocations(bytes.fromhex(ring["revocations_hex"]))
    for cert in ring["certificates_hex"]:
        held._add(bytes.fromhex(cert), None, refuse_revoked=False)
    return held


def box() -> BoxKey:
    spec = VECTORS["gateway_box"]
    key = BoxKey(spec["alg"], bytes.fromhex(spec["private_hex"]))
    assert key.kid == spec["kid"]
    assert key.public.public_raw == unb64u(spec["public_b64u"])
    return key


def checked(data: bytes, overrides: dict[str, Any] | None = None) -> object:
    state = {**VECTORS["state"], **(overrides or {})}
    answered = {int(c): v["ledger_value"] for c, v in state["answered"].items()}
    return check_command(data, gateway_id=state["gateway"], keyring=keyring(),
                         region=state["region"], now_ms=state["trusted_now_ms"],
                         floor_ms=state["floor_ms"] or 0, last_cseq=state["last_cseq"],
                         applied=answered.get, box=box())


@pytest.mark.parametrize("case", VECTORS["valid"], ids=lambda c: c["name"])
def test_valid_commands_are_applied(case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["canonical_hex"])
    assert data == case["canonical"].encode()
    assert command_digest(data) == case["sha256"]
    obj = json.loads(data)
    assert canonical({k: v for k, v in obj.items() if k != "sig"}).hex() == case["signed_hex"]
    jsonschema.validate(obj, SCHEMA)
    got = checked(data)
    assert isinstance(got, Command)
    assert got.kind == case["kind"]
    sealing = case.get("sealing")
    if sealing is not None:
        assert got.body.plain == bytes.fromhex(sealing["device_key_hex"])
        key = obj["body"]["key"]
        assert unb64u(key["epk"]).hex() == sealing["epk_hex"]
        device, ident = ("tag", obj["body"]["tag"]) if "tag" in obj["body"] else \
            ("kiosk", obj["body"]["serial"])
        assert device_key_aad(obj["gw"], device, ident).hex() == sealing["aad_hex"]
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        plain = AESGCM(bytes.fromhex(sealing["aes_key_hex"])).decrypt(
            bytes.fromhex(sealing["nonce_hex"]), unb64u(key["ct"]),
            bytes.fromhex(sealing["aad_hex"]))
        assert plain.hex() == sealing["device_key_hex"]


@pytest.mark.parametrize("case", VECTORS["invalid"], ids=lambda c: c["name"])
def test_invalid_commands_get_their_reason(case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["canonical_hex"])
    assert command_digest(data) == case["sha256"]
    got = checked(data, case["state"])
    if case["expect"] == "apply":
        assert isinstance(got, Command)
    elif case["expect"] == "duplicate":
        assert isinstance(got, Duplicate)
    else:
        assert isinstance(got, Refusal), got
        assert got.reason == case["expect"], got
        assert got.field == case.get("field")


def test_the_vectors_cover_every_check_of_the_spec() -> None:
    from core.commands import REASONS

    expected = {c["expect"] for c in VECTORS["invalid"]}
    # the gateway's own (conflict, failed) depend on its state; the key's dates on time
    assert set(REASONS) - expected == {"conflict", "failed", "expired_key",
                                       "key_not_yet_valid"}
    assert {"duplicate", "apply"} <= expected
    assert {c["kind"] for c in VECTORS["valid"]} == set(SCHEMA["$defs"]) - {
        "tag", "serial", "sealedKey"}


def test_every_kind_the_gateway_takes_has_its_schema_and_a_valid_vector() -> None:
    """Each kind of core/commands.py KINDS (request-diag among them) has its body in the
    schema, selected by its kind, and a valid vector; a body the gateway refuses for a
    field the schema can express fails the schema too."""
    from core.commands import KINDS

    selected = {rule["if"]["properties"]["kind"]["const"]: rule["then"]["properties"]["body"]
                for rule in SCHEMA["allOf"]}
    assert set(selected) == set(KINDS)
    assert all(ref == {"$ref": f"#/$defs/{kind}"} for kind, ref in selected.items())
    assert {c["kind"] for c in VECTORS["valid"]} == set(KINDS)
    for case in VECTORS["invalid"]:
        if case["name"] in ("diag_asks_for_personal_data", "diag_unknown_section",
                            "setting_out_of_range", "unknown_setting", "key_in_clear"):
            obj = json.loads(bytes.fromhex(case["canonical_hex"]))
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(obj, SCHEMA)


def test_the_box_document_verifies_with_the_identity() -> None:
    from core.commands import parse_box_document
    from core.suites import Verifier

    identity = VECTORS["keys"]["identity"]
    known = {identity["kid"]: Verifier(identity["alg"], unb64u(identity["public_b64u"]))}
    doc = VECTORS["gateway_box"]["document"]
    assert parse_box_document(doc, known, VECTORS["state"]["gateway"]) == box().public


def test_asyncapi_names_the_command_channel() -> None:
    import yaml

    from core.topics import commands_topic

    api = yaml.safe_load((DIRECTORY / "asyncapi.yaml").read_text())
    channels = {c["address"]: name for name, c in api["channels"].items()}
    assert commands_topic("{gatewayId}") in channels
    from core.commands import KINDS

    kinds = api["components"]["messages"]["command"]["payload"]["properties"]["kind"]
    assert set(kinds["enum"]) == set(KINDS)  # request-diag among them
    receive = api["operations"]["receiveCommand"]
    assert receive["action"] == "receive"
    assert receive["bindings"]["mqtt"]["qos"] == 1
