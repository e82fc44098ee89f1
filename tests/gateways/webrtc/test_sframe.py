"""SFrame (RFC 9605): the Appendix C test vectors, the context and VP8 partial encryption."""

from __future__ import annotations

import json
import pickle
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateways.webrtc import sframe
from gateways.webrtc.sframe import (
    MAX_CTR,
    MAX_KID,
    AuthenticationFailed,
    CipherSuite,
    CounterExhausted,
    Header,
    KeyUsage,
    MalformedFrame,
    MalformedHeader,
    SFrameContext,
    SFrameError,
    UnknownKey,
    decode_header,
    decrypt_frame,
    derive,
    encode_header,
    encrypt_frame,
    protect,
    unprotect,
    vp8_clear_bytes,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "rfc9605_vectors.json").read_text())

BASE_KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))


def _x(value: str) -> bytes:
    return bytes.fromhex(value)


def _n(value: str) -> int:
    return int(value, 16)


def _vector_id(v: dict[str, str]) -> str:
    return f"kid={v['kid']}-ctr={v['ctr']}"


# -- Appendix C.1: headers ---------------------------------------------------------------------


def test_header_vector_file_is_complete() -> None:
    # 17 KID values x 17 CTR values, as in the RFC; 3 AEAD and 5 SFrame vectors.
    assert len(VECTORS["header"]) == 289
    assert len({(v["kid"], v["ctr"]) for v in VECTORS["header"]}) == 289
    assert [v["cipher_suite"] for v in VECTORS["aes_ctr_hmac"]] == ["0x0001", "0x0002", "0x0003"]
    assert [v["cipher_suite"] for v in VECTORS["sframe"]] == [
        "0x0001", "0x0002", "0x0003", "0x0004", "0x0005"]


@pytest.mark.parametrize("v", VECTORS["header"], ids=_vector_id)
def test_header_vectors(v: dict[str, str]) -> None:
    kid, ctr, encoded = _n(v["kid"]), _n(v["ctr"]), _x(v["header"])
    assert encode_header(kid, ctr) == encoded
    assert Header(kid, ctr).encode() == encoded
    assert decode_header(encoded) == (Header(kid, ctr), len(encoded))
    # Trailing ciphertext does not change what the header says.
    assert decode_header(encoded + b"\xff" * 20) == (Header(kid, ctr), len(encoded))
    # Every proper prefix of the header is truncated.
    for cut in range(len(encoded)):
        with pytest.raises(MalformedHeader):
            decode_header(encoded[:cut])


# -- Appendix C.2: the AES-CTR + HMAC AEAD -----------------------------------------------------


@pytest.mark.parametrize("v", VECTORS["aes_ctr_hmac"], ids=lambda v: v["cipher_suite"])
def test_aes_ctr_hmac_vectors(v: dict[str, str]) -> None:
    suite = CipherSuite(_n(v["cipher_suite"]))
    key, nonce, aad, pt, ct = (_x(v[k]) for k in ("key", "nonce", "aad", "pt", "ct"))
    assert suite.nka is not None
    assert key[:suite.nka] == _x(v["enc_key"])
    assert key[suite.nka:] == _x(v["auth_key"])
    assert len(ct) == len(pt) + suite.nt
    assert sframe.aead_encrypt(suite, key, nonce, aad, pt) == ct
    assert sframe.aead_decrypt(suite, key, nonce, aad, ct) == pt
    for i in range(len(ct)):
        bad = bytearray(ct)
        bad[i] ^= 0x01
        with pytest.raises(AuthenticationFailed):
            sframe.aead_decrypt(suite, key, nonce, aad, bytes(bad))
    with pytest.raises(AuthenticationFailed):
        sframe.aead_decrypt(suite, key, nonce, aad + b"!", ct)
    with pytest.raises(AuthenticationFailed):
        sframe.aead_decrypt(suite, key, nonce, aad, ct[:suite.nt - 1])


# -- Appendix C.3: SFrame encryption -----------------------------------------------------------


@pytest.mark.parametrize("v", VECTORS["sframe"], ids=lambda v: v["cipher_suite"])
def test_sframe_vectors(v: dict[str, str]) -> None:
    suite = CipherSuite(_n(v["cipher_suite"]))
    kid, ctr = _n(v["kid"]), _n(v["ctr"])
    base_key, metadata, pt, ct = (_x(v[k]) for k in ("base_key", "metadata", "pt", "ct"))

    assert sframe.key_label(suite, kid) == _x(v["sframe_key_label"])
    assert sframe.salt_label(suite, kid) == _x(v["sframe_salt_label"])
    assert sframe.sframe_secret(suite, base_key) == _x(v["sframe_secret"])
    km = derive(suite, kid, base_key)
    assert km.key == _x(v["sframe_key"])
    assert km.salt == _x(v["sframe_salt"])
    assert sframe.make_nonce(km.salt, ctr) == _x(v["nonce"])
    assert encode_header(kid, ctr) + metadata == _x(v["aad"])

    # encrypt(ctr, kid, metadata, plaintext) == ct, statelessly ...
    assert encrypt_frame(km, ctr, pt, metadata) == ct
    assert decrypt_frame(km, ct, metadata) == (Header(kid, ctr), pt)

    # ... and through a context initialised with base_key assigned to kid.
    sender = SFrameContext(suite)
    sender.add_key(kid, base_key, usage=KeyUsage.ENCRYPT, next_ctr=ctr)
    assert sender.encrypt(kid, pt, metadata) == ct
    receiver = SFrameContext(suite)
    receiver.add_key(kid, base_key, usage=KeyUsage.DECRYPT)
    assert receiver.decrypt(ct, metadata) == (kid, pt)


def test_the_rfc_labels_are_the_documented_strings() -> None:
    label = sframe.key_label(CipherSuite.AES_128_GCM_SHA256_128, 0x0123)
    assert label == b"SFrame 1.0 Secret key " + bytes.fromhex("0000000000000123") + b"\x00\x04"
    label = sframe.salt_label(CipherSuite.AES_256_GCM_SHA512_128, 0x0123)
    assert label == b"SFrame 1.0 Secret salt " + bytes.fromhex("0000000000000123") + b"\x00\x05"


def test_cipher_suite_constants() -> None:
    table = {  # RFC 9605 Table 1: Nh, Nka, Nk, Nn, Nt
        CipherSuite.AES_128_CTR_HMAC_SHA256_80: (32, 16, 48, 12, 10),
        CipherSuite.AES_128_CTR_HMAC_SHA256_64: (32, 16, 48, 12, 8),
        CipherSuite.AES_128_CTR_HMAC_SHA256_32: (32, 16, 48, 12, 4),
        CipherSuite.AES_128_GCM_SHA256_128: (32, None, 16, 12, 16),
        CipherSuite.AES_256_GCM_SHA512_128: (64, None, 32, 12, 16),
    }
    for suite, (nh, nka, nk, nn, nt) in table.items():
        assert (suite.nh, suite.nka, suite.nk, suite.nn, suite.nt) == (nh, nka, nk, nn, nt)
        assert suite.hash.digest_size == nh
    assert [int(s) for s in CipherSuite] == [1, 2, 3, 4, 5]


# -- headers beyond the vectors ----------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"",
    b"\x80",                      # KID of 1 byte announced, none present
    b"\x08",                      # CTR of 1 byte announced, none present
    b"\xf0" + b"\xff" * 7,        # KID of 8 bytes, 7 present
    b"\x8f\x09" + b"\xff" * 7,    # KID complete, CTR of 8 bytes, 7 present
])
def test_truncated_headers_are_malformed(data: bytes) -> None:
    with pytest.raises(MalformedHeader):
        decode_header(data)


@pytest.mark.parametrize("data", [
    b"\x80\x05",        # KID 5 must be inline
    b"\x08\x07",        # CTR 7 must be inline
    b"\x90\x00\xff",    # KID 0x00ff in 2 bytes: leading zero
    b"\x09\x00\x08",    # CTR 0x0008 in 2 bytes: leading zero
])
def test_non_minimal_headers_are_malformed(data: bytes) -> None:
    with pytest.raises(MalformedHeader):
        decode_header(data)


def test_malformed_header_is_an_sframe_error_and_a_value_error() -> None:
    with pytest.raises(SFrameError):
        decode_header(b"")
    with pytest.raises(ValueError):
        decode_header(b"")


@pytest.mark.parametrize(("kid", "ctr"), [(-1, 0), (0, -1), (MAX_KID + 1, 0), (0, MAX_CTR + 1)])
def test_encode_header_rejects_out_of_range(kid: int, ctr: int) -> None:
    with pytest.raises(ValueError):
        encode_header(kid, ctr)


@given(st.integers(0, MAX_KID), st.integers(0, MAX_CTR))
def test_header_round_trip(kid: int, ctr: int) -> None:
    encoded = encode_header(kid, ctr)
    assert decode_header(encoded) == (Header(kid, ctr), len(encoded))
    assert len(encoded) <= 17


@given(st.binary(max_size=24))
def test_decode_header_of_any_bytes(data: bytes) -> None:
    try:
        header, n = decode_header(data)
    except MalformedHeader:
        return
    assert data[:n] == encode_header(header.kid, header.ctr)


# -- the context -------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", list(CipherSuite), ids=lambda s: s.name)
@pytest.mark.parametrize("kid", [0, 7, 8, 0x1234, MAX_KID])
def test_round_trip(suite: CipherSuite, kid: int) -> None:
    ctx = SFrameContext(suite)
    ctx.add_key(kid, BASE_KEY)
    for pt, metadata in [(b"", b""), (b"frame", b""), (bytes(1500), b"rtp header ext"),
                         (b"x" * 70_000, b"m")]:
        ct = ctx.encrypt(kid, pt, metadata)
        assert len(ct) == len(encode_header(kid, ctx.next_counter(kid) - 1)) + len(pt) + suite.nt
        assert ctx.decrypt(ct, metadata) == (kid, pt)


def test_counters_strictly_increase_per_kid() -> None:
    ctx = SFrameContext()
    ctx.add_key(1, BASE_KEY)
    ctx.add_key(300, OTHER_KEY)
    seen: dict[int, list[int]] = {1: [], 300: []}
    for i in range(40):
        kid = 1 if i % 3 else 300
        header, _ = decode_header(ctx.encrypt(kid, b"frame"))
        assert header.kid == kid
        seen[kid].append(header.ctr)
    for ctrs in seen.values():
        assert ctrs == list(range(len(ctrs)))
    assert ctx.next_counter(1) == len(seen[1])
    assert ctx.next_counter(300) == len(seen[300])


def test_counter_survives_remove_and_re_add() -> None:
    ctx = SFrameContext()
    ctx.add_key(5, BASE_KEY)
    ctrs = [decode_header(ctx.encrypt(5, b"a"))[0].ctr for _ in range(3)]
    ctx.remove_key(5)
    ctx.add_key(5, BASE_KEY)                 # same KID, same key: must not restart at 0
    ctrs += [decode_header(ctx.encrypt(5, b"a"))[0].ctr for _ in range(3)]
    ctx.add_key(5, OTHER_KEY)                # replaced key: still no reuse
    ctx.add_key(5, OTHER_KEY, next_ctr=1)    # a lower resume point is ignored
    ctrs += [decode_header(ctx.encrypt(5, b"a"))[0].ctr for _ in range(3)]
    assert ctrs == list(range(9))
    ctx.add_key(5, OTHER_KEY, next_ctr=1000)  # a persisted counter moves it forward
    assert decode_header(ctx.encrypt(5, b"a"))[0].ctr == 1000


def test_counters_are_unique_across_threads() -> None:
    ctx = SFrameContext()
    ctx.add_key(9, BASE_KEY)
    out: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [decode_header(ctx.encrypt(9, b"f"))[0].ctr for _ in range(250)]
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out) == list(range(1000))


def test_counter_exhaustion() -> None:
    ctx = SFrameContext()
    ctx.add_key(2, BASE_KEY, next_ctr=MAX_CTR)
    last = ctx.encrypt(2, b"last")
    assert decode_header(last)[0] == Header(2, MAX_CTR)
    assert ctx.decrypt(last) == (2, b"last")
    with pytest.raises(CounterExhausted):
        ctx.encrypt(2, b"one too many")
    with pytest.raises(CounterExhausted):
        ctx.encrypt(2, b"still")
    assert ctx.next_counter(2) == MAX_CTR + 1
    ctx.add_key(2, OTHER_KEY)   # a new key under the same KID does not reset the counter
    with pytest.raises(CounterExhausted):
        ctx.encrypt(2, b"nor after a re-key")
    ctx.add_key(3, OTHER_KEY)   # a new KID does
    assert decode_header(ctx.encrypt(3, b"ok"))[0] == Header(3, 0)
    with pytest.raises(ValueError):
        ctx.add_key(4, BASE_KEY, next_ctr=MAX_CTR + 1)


def _sealed(suite: CipherSuite = CipherSuite.AES_128_GCM_SHA256_128,
            kid: int = 0x1234) -> tuple[SFrameContext, bytes]:
    ctx = SFrameContext(suite)
    ctx.add_key(kid, BASE_KEY)
    for _ in range(300):        # a CTR past 255: a two-byte counter in the header
        ctx.encrypt(kid, b"warm up")
    return ctx, ctx.encrypt(kid, b"the media frame", b"metadata")


@pytest.mark.parametrize("suite", list(CipherSuite), ids=lambda s: s.name)
def test_tampered_ciphertext_fails(suite: CipherSuite) -> None:
    ctx, ct = _sealed(suite)
    n = decode_header(ct)[1]
    for i in range(n, len(ct)):
        bad = bytearray(ct)
        bad[i] ^= 0x80
        with pytest.raises(AuthenticationFailed):
            ctx.decrypt(bytes(bad), b"metadata")
    with pytest.raises(AuthenticationFailed):
        ctx.decrypt(ct[:-1], b"metadata")
    with pytest.raises(AuthenticationFailed):
        ctx.decrypt(ct[:n + suite.nt - 1], b"metadata")
    assert ctx.decrypt(ct, b"metadata") == (0x1234, b"the media frame")


def test_tampered_header_fails() -> None:
    ctx, ct = _sealed()
    header, n = decode_header(ct)
    assert header.ctr == 300
    for ctr in (299, 301, 300 + 256, 0):
        forged = encode_header(header.kid, ctr) + ct[n:]
        with pytest.raises(AuthenticationFailed):
            ctx.decrypt(forged, b"metadata")
    bad = bytearray(ct)
    bad[n - 1] ^= 0x01      # the low CTR byte
    with pytest.raises(AuthenticationFailed):
        ctx.decrypt(bytes(bad), b"metadata")


def test_tampered_metadata_fails() -> None:
    ctx, ct = _sealed()
    for metadata in (b"", b"metadatA", b"metadata\x00", b"other"):
        with pytest.raises(AuthenticationFailed):
            ctx.decrypt(ct, metadata)


def test_wrong_key_under_the_same_kid_fails() -> None:
    _, ct = _sealed()
    other = SFrameContext()
    other.add_key(0x1234, OTHER_KEY)
    with pytest.raises(AuthenticationFailed):
        other.decrypt(ct, b"metadata")
    other_suite = SFrameContext(CipherSuite.AES_256_GCM_SHA512_128)
    other_suite.add_key(0x1234, BASE_KEY)
    with pytest.raises(AuthenticationFailed):
        other_suite.decrypt(ct, b"metadata")


def test_unknown_kid() -> None:
    ctx, ct = _sealed()
    receiver = SFrameContext()
    receiver.add_key(0x1235, BASE_KEY)
    with pytest.raises(UnknownKey):
        receiver.decrypt(ct, b"metadata")
    with pytest.raises(UnknownKey):
        receiver.encrypt(0x1234, b"x")
    ctx.remove_key(0x1234)
    ctx.remove_key(0x1234)      # idempotent
    assert not ctx.has_key(0x1234)
    with pytest.raises(UnknownKey):
        ctx.decrypt(ct, b"metadata")
    with pytest.raises(UnknownKey):
        ctx.encrypt(0x1234, b"x")
    km = derive(CipherSuite.AES_128_GCM_SHA256_128, 0x1235, BASE_KEY)
    with pytest.raises(UnknownKey):
        decrypt_frame(km, ct, b"metadata")


def test_key_usage_is_one_direction() -> None:
    ctx = SFrameContext()
    ctx.add_key(1, BASE_KEY, usage=KeyUsage.ENCRYPT)
    ctx.add_key(2, OTHER_KEY, usage=KeyUsage.DECRYPT)
    own = ctx.encrypt(1, b"mine")
    with pytest.raises(UnknownKey):
        ctx.decrypt(own)                 # a send key does not open frames
    with pytest.raises(UnknownKey):
        ctx.encrypt(2, b"x")             # a receive key does not seal them
    peer = SFrameContext()
    peer.add_key(2, OTHER_KEY, usage=KeyUsage.ENCRYPT)
    assert ctx.decrypt(peer.encrypt(2, b"theirs")) == (2, b"theirs")
    assert ctx.kids() == [1, 2]


@pytest.mark.parametrize("data", [b"", b"\x80", b"\x9f\x01", b"\x00"])
def test_decrypt_of_truncated_input(data: bytes) -> None:
    ctx = SFrameContext()
    ctx.add_key(0, BASE_KEY)
    with pytest.raises(SFrameError) as info:
        ctx.decrypt(data)
    if data != b"\x00":
        assert isinstance(info.value, MalformedHeader)
    else:   # a complete header (KID 0, CTR 0) with no tag
        assert isinstance(info.value, AuthenticationFailed)


def test_random_input_only_raises_sframe_errors() -> None:
    ctx = SFrameContext()
    for kid in (0, 1, 8, 0x1234):
        ctx.add_key(kid, BASE_KEY)
    rng = random.Random(9605)
    for _ in range(3000):
        data = rng.randbytes(rng.randrange(0, 40))
        try:
            ctx.decrypt(data, rng.randbytes(rng.randrange(0, 4)))
        except SFrameError:
            continue
        pytest.fail(f"{data.hex()} decrypted")


def test_base_key_must_be_long_enough() -> None:
    short = b"\xaa" * 15
    with pytest.raises(ValueError) as info:
        derive(CipherSuite.AES_128_GCM_SHA256_128, 1, short)
    assert short.hex() not in str(info.value)
    with pytest.raises(TypeError):
        derive(CipherSuite.AES_128_GCM_SHA256_128, 1, "a string key" * 4)  # type: ignore[arg-type]


# -- no key in any repr ------------------------------------------------------------------------


@pytest.mark.parametrize("suite", list(CipherSuite), ids=lambda s: s.name)
def test_keys_never_show(suite: CipherSuite) -> None:
    km = derive(suite, 0x42, BASE_KEY)
    secrets = [km.key.hex(), km.salt.hex(), BASE_KEY.hex(),
               sframe.sframe_secret(suite, BASE_KEY).hex()]
    texts = [repr(km), str(km), f"{km}", f"{km!r}"]
    ctx = SFrameContext(suite)
    ctx.add_key(0x42, BASE_KEY)
    texts += [repr(ctx), str(ctx)]
    ct = ctx.encrypt(0x42, b"frame")
    for bad_input, metadata in [(ct[:-1], b""), (ct, b"x"), (b"\x80", b""), (b"\x50", b"")]:
        try:
            ctx.decrypt(bad_input, metadata)
        except SFrameError as exc:
            texts += [str(exc), repr(exc)]
    assert "KeyMaterial" in repr(km)
    for text in texts:
        for secret in secrets:
            assert secret not in text
            assert secret.upper() not in text
        assert repr(km.key) not in text and repr(km.salt) not in text
    with pytest.raises(TypeError):
        pickle.dumps(km)


# -- VP8 partial encryption --------------------------------------------------------------------

# A VP8 key frame starts with a 3-byte frame tag (bit 0 = 0: key frame), the start code
# 9d 01 2a and 2+2 bytes of width/height (RFC 6386 9.1); a delta frame with its frame tag.
KEY_FRAME = bytes.fromhex("5002009d012a8002e001") + bytes(range(256)) * 4
DELTA_FRAME = bytes.fromhex("b10100") + bytes(range(200))


def test_vp8_clear_bytes() -> None:
    assert vp8_clear_bytes(KEY_FRAME) == 10
    assert vp8_clear_bytes(DELTA_FRAME) == 3
    assert vp8_clear_bytes(KEY_FRAME[:10]) == 10
    assert vp8_clear_bytes(b"\x01\x00\x00") == 3
    for short in (b"", KEY_FRAME[:9], b"\x01\x00"):
        with pytest.raises(MalformedFrame):
            vp8_clear_bytes(short)


def _pair() -> tuple[SFrameContext, SFrameContext]:
    sender, receiver = SFrameContext(), SFrameContext()
    sender.add_key(77, BASE_KEY, usage=KeyUsage.ENCRYPT)
    receiver.add_key(77, BASE_KEY, usage=KeyUsage.DECRYPT)
    return sender, receiver


@pytest.mark.parametrize(("frame", "clear"), [(KEY_FRAME, 10), (DELTA_FRAME, 3)],
                         ids=["key", "delta"])
def test_vp8_protect_round_trip(frame: bytes, clear: int) -> None:
    sender, receiver = _pair()
    assert vp8_clear_bytes(frame) == clear
    data = protect(sender, 77, frame, vp8_clear_bytes(frame))
    assert data[:clear] == frame[:clear]             # readable by packetizer and SFU
    header, n = decode_header(data[clear:])          # the SFrame header right after
    assert header == Header(77, 0)
    assert len(data) == clear + n + len(frame) - clear + 16
    assert frame[clear:clear + 16] not in data[clear:]
    assert vp8_clear_bytes(data) == clear            # the receiver finds the same prefix
    assert unprotect(receiver, data, vp8_clear_bytes(data)) == (77, frame)
    assert receiver.unprotect(data, clear) == (77, frame)
    # The clear prefix is the SFrame metadata of the rest.
    assert receiver.decrypt(data[clear:], metadata=frame[:clear]) == (77, frame[clear:])
    # A second frame gets the next counter.
    assert decode_header(sender.protect(77, frame, clear)[clear:])[0] == Header(77, 1)


@pytest.mark.parametrize(("frame", "clear"), [(KEY_FRAME, 10), (DELTA_FRAME, 3)],
                         ids=["key", "delta"])
def test_vp8_tampered_clear_byte_fails(frame: bytes, clear: int) -> None:
    sender, receiver = _pair()
    data = protect(sender, 77, frame, clear)
    for i in range(clear):
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= bit
            with pytest.raises(AuthenticationFailed):
                unprotect(receiver, bytes(bad), clear)
            # With the prefix length re-read from the tampered frame, still no plaintext.
            try:
                recomputed = vp8_clear_bytes(bytes(bad))
            except MalformedFrame:
                continue
            with pytest.raises(SFrameError):
                unprotect(receiver, bytes(bad), recomputed)
    bad = bytearray(data)
    bad[-1] ^= 0x01
    with pytest.raises(AuthenticationFailed):
        unprotect(receiver, bytes(bad), clear)


def test_protect_bounds() -> None:
    sender, receiver = _pair()
    with pytest.raises(MalformedFrame):
        protect(sender, 77, b"abc", 4)
    with pytest.raises(MalformedFrame):
        protect(sender, 77, b"abc", -1)
    with pytest.raises(MalformedFrame):
        unprotect(receiver, b"abc", 4)
    with pytest.raises(ValueError):
        unprotect(receiver, b"abc", -1)
    with pytest.raises(MalformedHeader):
        unprotect(receiver, b"abc", 3)          # nothing after the prefix
    whole = protect(sender, 77, b"abc", 3)       # everything clear: only authenticated
    assert whole[:3] == b"abc"
    assert unprotect(receiver, whole, 3) == (77, b"abc")
    plain = protect(sender, 77, b"abc", 0)       # nothing clear: a plain SFrame ciphertext
    assert receiver.decrypt(plain) == (77, b"abc")
