"""The cryptographic suites against the standards' own test vectors (core/suites.py).

SM2: GB/T 32918.2-2016 Annex A / GM/T 0003.5 example on the recommended curve, signer id
"1234567812345678" (GM/T 0009), message "message digest". SM3: GB/T 32905-2016 Annex A
(GM/T 0004-2012). SM4: GB/T 32907-2016 Annex A (GM/T 0002-2012) example 1. SM4-GCM:
RFC 8998 Appendix A.1. Ed25519: RFC 8032 section 7.1, test 1.
"""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from core.suites import (
    ECDSA_P256,
    ED25519,
    SIGNATURE_ALGS,
    SM2,
    SM4GCM,
    SUITES,
    SoftwareKey,
    UnknownAlgorithmError,
    Verifier,
    digest,
    key_id,
    storage_aead,
    suite,
)

# -- SM2 (GB/T 32918.2-2016 Annex A, recommended curve, default signer id) -----------------
SM2_D = bytes.fromhex("3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8")
SM2_P = bytes.fromhex("04"
                      "09F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020"
                      "CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13")
SM2_MSG = b"message digest"
SM2_E = bytes.fromhex("F0B43E94BA45ACCAACE692ED534382EB17E6AB5A19CE7B31F4486FDFC0D28640")
SM2_SIG = bytes.fromhex("F5A03B0648D2C4630EEAC513E1BB81A15944DA3827D5B74143AC7EACEEE720B3"
                        "B1B6AA29DF212FD8763182BC0D421CA1BB9038FD1F7F42D4840B69C485BBC1AA")


def test_sm2_standard_signature_verifies() -> None:
    key = Verifier(SM2, SM2_P)
    assert key.verify(SM2_SIG, SM2_MSG)
    assert not key.verify(SM2_SIG, b"message digesT")
    bad = bytearray(SM2_SIG)
    bad[5] ^= 1
    assert not key.verify(bytes(bad), SM2_MSG)
    assert not key.verify(SM2_SIG[:63], SM2_MSG)


def test_sm2_standard_key_signs_what_the_standard_key_verifies() -> None:
    key = SoftwareKey(SM2, SM2_D, SM2_P)
    sig = key.sign(SM2_MSG)
    assert len(sig) == 64
    assert sig != SM2_SIG  # k is random: a fresh signature, not the standard's
    assert Verifier(SM2, SM2_P).verify(sig, SM2_MSG)


def test_sm2_digest_of_the_standard_example() -> None:
    """e = SM3(Z_A || M) of the standard: what a TPM signs for an SM2 identity key."""
    from provisioning.tpm import sm2_digest

    assert sm2_digest(SM2_P, SM2_MSG) == SM2_E


def test_an_sm2_key_file_with_the_wrong_public_key_is_refused() -> None:
    other = SoftwareKey.generate(SM2)
    with pytest.raises(ValueError, match="does not belong"):
        SoftwareKey(SM2, SM2_D, other.public_raw)


# -- SM3 (GB/T 32905-2016 Annex A) ----------------------------------------------------------
@pytest.mark.parametrize(("message", "expected"), [
    (b"abc", "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"),
    (b"abcd" * 16, "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"),
])
def test_sm3_standard_vectors(message: bytes, expected: str) -> None:
    assert digest(SM2, message).hex() == expected


# -- SM4 (GB/T 32907-2016 Annex A, example 1) and SM4-GCM (RFC 8998 A.1) ----------------------
def test_sm4_block_standard_vector() -> None:
    key = bytes.fromhex("0123456789abcdeffedcba9876543210")
    enc = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()  # noqa: S305 - one block, a KAT
    assert (enc.update(key) + enc.finalize()).hex() == "681edf34d206965e86b3e94f536e4246"


GCM_KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
GCM_IV = bytes.fromhex("00001234567800000000ABCD")
GCM_AAD = bytes.fromhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2")
GCM_PT = bytes.fromhex("AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD"
                       "EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA")
GCM_CT_TAG = bytes.fromhex("17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735"
                           "D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D"
                           "83DE3541E4C2B58177E065A9BF7B62EC")


def test_sm4_gcm_rfc8998_vector() -> None:
    aead = SM4GCM(GCM_KEY)
    assert aead.encrypt(GCM_IV, GCM_PT, GCM_AAD) == GCM_CT_TAG
    assert aead.decrypt(GCM_IV, GCM_CT_TAG, GCM_AAD) == GCM_PT
    for index in (0, 63, 64, 79):
        damaged = bytearray(GCM_CT_TAG)
        damaged[index] ^= 1
        with pytest.raises(InvalidTag):
            aead.decrypt(GCM_IV, bytes(damaged), GCM_AAD)
    with pytest.raises(InvalidTag):
        aead.decrypt(GCM_IV, GCM_CT_TAG, GCM_AAD + b"x")
    with pytest.raises(InvalidTag):
        aead.decrypt(GCM_IV, GCM_CT_TAG[:10], GCM_AAD)


def test_the_storage_key_length_names_the_cipher() -> None:
    assert isinstance(storage_aead(bytes(16)), SM4GCM)
    assert isinstance(storage_aead(bytes(32)), AESGCM)
    with pytest.raises(ValueError, match=r"32 or 16 bytes, not 24"):
        storage_aead(bytes(24))
    assert SUITES["sm"].aead(GCM_KEY).encrypt(GCM_IV, GCM_PT, GCM_AAD) == GCM_CT_TAG


# -- Ed25519 (RFC 8032 section 7.1, test 1) -------------------------------------------------
def test_ed25519_rfc8032_test1() -> None:
    key = SoftwareKey(ED25519, bytes.fromhex(
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))
    assert key.public_raw.hex() == \
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    sig = bytes.fromhex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
                        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    assert key.sign(b"") == sig  # Ed25519 is deterministic
    assert Verifier(ED25519, key.public_raw).verify(sig, b"")
    # format-1 key ids: SHA-256 of the raw key, 12 bytes, base64url
    from core.record import key_id as legacy_key_id
    assert key_id(ED25519, key.public_raw) == legacy_key_id(key._ed.public_key())


# -- every algorithm: round trips and refusals ---------------------------------------------
@pytest.mark.parametrize("alg", SIGNATURE_ALGS)
def test_a_signature_verifies_only_for_its_data_key_and_algorithm(alg: str) -> None:
    key = SoftwareKey.generate(alg)
    again = SoftwareKey(alg, key.private_bytes(), key.public_raw)
    assert again.public_raw == key.public_raw
    sig = key.sign(b"record")
    assert Verifier(alg, key.public_raw).verify(sig, b"record")
    assert not Verifier(alg, key.public_raw).verify(sig, b"recorD")
    other = SoftwareKey.generate(alg)
    assert not Verifier(alg, other.public_raw).verify(sig, b"record")
    assert not Verifier(alg, key.public_raw).verify(b"", b"record")
    assert key.kid == key_id(alg, key.public_raw)


def test_one_point_is_two_keys_under_two_algorithms() -> None:
    """SM2 and P-256 public keys share the 65-byte shape, not the curve: a P-256 signature
    never verifies as SM2 (the record's alg is signed, so it cannot be swapped either)."""
    key = SoftwareKey.generate(ECDSA_P256)
    sig = key.sign(b"x")
    try:
        ok = Verifier(SM2, key.public_raw).verify(sig, b"x")
    except ValueError:  # not a point of the SM2 curve
        ok = False
    assert not ok


def test_unknown_names_are_refused() -> None:
    with pytest.raises(UnknownAlgorithmError):
        digest("rsa-md5", b"")
    with pytest.raises(UnknownAlgorithmError):
        suite("nist")
    with pytest.raises(UnknownAlgorithmError):
        SoftwareKey.generate("rsa-md5")


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=300), flip=st.integers(min_value=0, max_value=511))
def test_any_change_to_signed_bytes_is_seen(data: bytes, flip: int) -> None:
    for alg in (ED25519, SM2):
        key = KEYS[alg]
        sig = key.sign(data)
        check = Verifier(alg, key.public_raw)
        assert check.verify(sig, data)
        changed = bytearray(data + b"\0")
        changed[flip % len(changed)] ^= 0x01
        assert not check.verify(sig, bytes(changed))


KEYS = {alg: SoftwareKey.generate(alg) for alg in (ED25519, SM2)}
