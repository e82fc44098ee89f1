"""The data plane's per-frame step for each role, on built frames (no sockets, no root)."""

from __future__ import annotations

import itertools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateways.opot.dataplane import DROPS, ETH_P_NSH, ChainNode, main
from gateways.opot.masks import LinkKeys
from gateways.opot.pot import Controller, Egress, Ingress, Profile, Transit, hop
from gateways.opot.wire import MD_CLASS, TYPE_OPOT, TYPE_POT, NextProtocol, NshPot
from keyclient.installer import SessionKey
from keyclient.policy import KeySource
from qgw.secret import Secret

NODES = ("ingress", "sf1", "sf2", "egress")
PATH = "uc15"
SPI = 0x00ABCD
DST = bytes.fromhex("020000000002")
SRC = bytes.fromhex("020000000001")


def eth(ethertype: int, payload: bytes, dst: bytes = DST, src: bytes = SRC) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big") + payload


IPV4 = eth(0x0800, bytes.fromhex("4500001c00010000401100000a5800010a580002") + b"udp-ish!")
IPV6 = eth(0x86DD, bytes.fromhex("6000000000081140") + bytes(32) + b"8 bytes.")
ARP = eth(0x0806, bytes.fromhex("0001080006040001") + SRC + bytes([10, 88, 0, 1]) + bytes(6)
          + bytes([10, 88, 0, 2]), dst=b"\xff" * 6)


@dataclass
class Chain:
    """ingress -> sf1 -> sf2 -> egress as ChainNodes, keyed like the netns test's nodes."""

    profile: Profile
    ingress: ChainNode
    sf1: ChainNode
    sf2: ChainNode
    egress: ChainNode

    @classmethod
    def build(cls, *, ordered: bool = True, activate: bool = True,
              rnd: int | None = None) -> Chain:
        profile = Controller.make_profile(NODES, os.urandom(32), path=PATH)
        tx: dict[str, LinkKeys | None] = {}
        rx: dict[str, LinkKeys | None] = {}
        for a, b in itertools.pairwise(NODES):
            tx[a] = rx[b] = None
            if ordered:
                key = SessionKey(1, KeySource.QKD, "kid-1", Secret(os.urandom(32)))
                tx[a], rx[b] = LinkKeys(PATH, a, b), LinkKeys(PATH, a, b)
                for lk in (tx[a], rx[b]):
                    assert lk is not None
                    lk.install(1, key)
                    lk.activate(1)
        ingress = Ingress("ingress", ordered=ordered, downstream=tx["ingress"],
                          rnd=None if rnd is None else (lambda p: rnd))
        ingress.install(profile.node("ingress"))
        if activate:
            ingress.activate(0)
        sfs = []
        for name in ("sf1", "sf2"):
            t = Transit(name, ordered=ordered, upstream=rx[name], downstream=tx[name])
            t.install(profile.node(name))
            sfs.append(ChainNode("transit", "l", "r", t, spi=SPI))
        egress = Egress("egress", ordered=ordered, upstream=rx["egress"])
        egress.install(profile.verifier())
        return cls(profile, ChainNode("ingress", "l", "r", ingress, spi=SPI), *sfs,
                   ChainNode("egress", "l", "r", egress, spi=SPI))

    def through(self, frame: bytes) -> bytes | None:
        out: bytes | None = frame
        for node in (self.ingress, self.sf1, self.sf2, self.egress):
            assert out is not None
            out = node.process(out)
        return out


def test_ingress_encapsulates_behind_the_same_macs_with_si_255_and_ethernet_inside() -> None:
    c = Chain.build(rnd=12345)
    out = c.ingress.process(IPV4)
    assert out is not None and len(out) == len(IPV4) + 54
    assert out[:12] == IPV4[:12]
    assert int.from_bytes(out[12:14], "big") == ETH_P_NSH == 0x894F
    w0, w1, md_class, md_type, md_len = struct.unpack_from("!IIHBB", out, 14)
    # Ver 0, O 0, TTL 63, Length 10 words, MD type 2, next protocol Ethernet (3)
    assert w0 == 63 << 22 | 10 << 16 | 2 << 8 | 3
    assert w1 == SPI << 8 | 255
    assert (md_class, md_type, md_len) == (MD_CLASS, TYPE_OPOT, 28)
    flags, seq, rnd, _cml = struct.unpack_from("!IQQQ", out, 26)
    assert (flags, seq, rnd) == (1 << 30, 1, 12345)   # P: profile 0; K: phase of epoch 1
    assert out[54:] == IPV4
    nsh = NshPot.parse(out[14:])
    assert nsh.next_protocol == NextProtocol.ETHERNET and nsh.si == 255 and nsh.spi == SPI
    assert c.ingress.counters == {"proved": 1}


def test_ingress_proves_ipv6_too_and_plain_mode_uses_the_pot_type() -> None:
    c = Chain.build(ordered=False)
    out = c.ingress.process(IPV6)
    assert out is not None and out[54:] == IPV6 and out[24] == TYPE_POT


def test_arp_passes_every_role_unchanged() -> None:
    c = Chain.build()
    forward = ChainNode("forward", "l", "r", None, spi=SPI)
    for node in (c.ingress, c.sf1, c.sf2, c.egress, forward):
        assert node.process(ARP) == ARP
        assert node.counters == {"passed": 1}
    assert c.egress.logic is not None and c.ingress.logic is not None
    assert isinstance(c.ingress.logic, Ingress) and c.ingress.logic.next_seq == 1


def test_ingress_without_a_key_drops() -> None:
    c = Chain.build(activate=False)
    assert c.ingress.process(IPV4) is None
    assert c.ingress.counters == {"no_key": 1}


def test_transit_decrements_si_and_ttl_and_adds_its_share() -> None:
    c = Chain.build(ordered=False)
    stamped = c.ingress.process(IPV4)
    assert stamped is not None
    out = c.sf1.process(stamped)
    assert out is not None and len(out) == len(stamped)
    assert out[:14] == stamped[:14] and out[54:] == IPV4
    before, after = NshPot.parse(stamped[14:]), NshPot.parse(out[14:])
    assert (after.si, after.ttl, after.spi) == (254, 62, SPI)
    p = before.proof
    assert after.proof == p._replace(cml=hop(c.profile.node("sf1"), p.rnd, p.cml))
    assert c.sf1.counters == {"forwarded": 1}


def test_transit_remasks_in_ordered_mode() -> None:
    c = Chain.build()
    stamped = c.ingress.process(IPV4)
    assert stamped is not None
    out = c.sf1.process(stamped)
    assert out is not None
    before, after = NshPot.parse(stamped[14:]), NshPot.parse(out[14:])
    assert after.si == 254 and after.proof.seq == before.proof.seq
    assert after.proof.cml != before.proof.cml


def test_transit_passes_frames_without_nsh() -> None:
    c = Chain.build()
    assert c.sf1.process(IPV4) == IPV4
    assert c.sf1.process(IPV6) == IPV6
    assert c.sf1.counters == {"passed": 2}


def test_egress_strips_to_the_exact_original_frame() -> None:
    c = Chain.build()
    for frame in (IPV4, IPV6, eth(0x0800, os.urandom(1400))):
        assert c.through(frame) == frame
    assert c.egress.counters == {"verified": 3}


def test_full_chain_in_plain_mode_verifies() -> None:
    c = Chain.build(ordered=False)
    assert c.through(IPV4) == IPV4


def test_egress_drops_unproven_ip() -> None:
    c = Chain.build()
    assert c.egress.process(IPV4) is None
    assert c.egress.process(IPV6) is None
    assert c.egress.process(eth(0x8100, b"\x00\x01\x08\x00" + IPV4[14:])) is None  # VLAN
    assert c.egress.counters == {"unproven": 3}


def test_egress_rejects_a_skipped_node_a_replay_and_a_forged_cml() -> None:
    c = Chain.build()
    stamped = c.ingress.process(IPV4)
    assert stamped is not None
    skipped = c.sf2.process(stamped)                   # sf1 bypassed
    assert skipped is not None and c.egress.process(skipped) is None
    good = c.sf2.process(c.sf1.process(c.ingress.process(IPV4)) or b"")
    assert good is not None
    assert c.egress.process(good) == IPV4
    assert c.egress.process(good) is None              # replayed
    forged = c.sf2.process(c.sf1.process(c.ingress.process(IPV4)) or b"")
    assert forged is not None
    forged = forged[:46] + bytes([forged[46] ^ 1]) + forged[47:]   # a CML bit
    assert c.egress.process(forged) is None
    assert c.egress.counters == {"verified": 1, "rejected": 3}
    assert isinstance(c.egress.logic, Egress)
    assert c.egress.logic.rejected == {"proof": 2, "replay": 1}


def test_transit_drops_what_it_cannot_process() -> None:
    ordered, plain = Chain.build(), Chain.build(ordered=False)
    stamped = plain.ingress.process(IPV4)
    assert stamped is not None
    assert ordered.sf1.process(stamped) is None        # plain proof at an ordered node
    assert ordered.sf1.counters == {"invalid": 1}


@pytest.mark.parametrize("role", ["transit", "egress"])
def test_truncated_garbled_and_foreign_nsh_is_dropped_and_counted(role: str) -> None:
    c = Chain.build()
    node = c.sf1 if role == "transit" else c.egress
    stamped = c.ingress.process(IPV4)
    assert stamped is not None
    cases = {
        "runt": stamped[:13],
        "truncated": stamped[:14 + 30],
        "header only": stamped[:14 + 4],
        "version 1": stamped[:14] + bytes([stamped[14] | 0x40]) + stamped[15:],
        "MD type 1": stamped[:16] + bytes([0x01]) + stamped[17:],
        "length past the end": stamped[:14] + bytes([stamped[14], 0x3F]) + stamped[16:54],
        "no OPoT TLV": stamped[:22] + b"\x00\x01" + stamped[24:],
    }
    for name, frame in cases.items():
        assert node.process(frame) is None, name
    other = bytearray(stamped)
    other[18:21] = (SPI + 1).to_bytes(3, "big")
    assert node.process(bytes(other)) is None
    expired = bytearray(stamped)
    expired[21] = 0                                     # SI 0
    assert node.process(bytes(expired)) is None
    assert node.counters == {"malformed": len(cases), "other_path": 1, "expired": 1}
    assert set(node.counters) <= DROPS


def test_egress_drops_nsh_that_does_not_carry_ethernet() -> None:
    c = Chain.build()
    stamped = c.sf2.process(c.sf1.process(c.ingress.process(IPV4)) or b"")
    assert stamped is not None
    ipv4_inside = stamped[:17] + bytes([NextProtocol.IPV4]) + stamped[18:]
    assert c.egress.process(ipv4_inside) is None
    assert c.egress.process(stamped[:54] + IPV4[:10]) is None      # inner runt
    assert c.egress.counters == {"malformed": 2}


def test_forward_passes_everything() -> None:
    node = ChainNode("forward", "l", "r", None, spi=SPI)
    c = Chain.build()
    stamped = c.ingress.process(IPV4)
    for frame in (IPV4, ARP, stamped or b"", b"\x00"):
        assert node.process(frame) == frame
    assert node.counters == {"passed": 4}


def test_role_and_logic_must_match() -> None:
    c = Chain.build()
    with pytest.raises(ValueError, match="Transit"):
        ChainNode("transit", "l", "r", c.egress.logic, spi=SPI)
    with pytest.raises(ValueError, match="role"):
        ChainNode("middlebox", "l", "r", None, spi=SPI)
    with pytest.raises(ValueError, match="SPI"):
        ChainNode("forward", "l", "r", None, spi=1 << 24)
    with pytest.raises(ValueError, match="different"):
        ChainNode("forward", "l", "l", None, spi=SPI)


def test_harness_builds_its_node_and_fails_cleanly_on_a_missing_interface(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"path": PATH, "nodes": list(NODES),
                                   "randomness": os.urandom(32).hex()}))
    links = tmp_path / "links.json"
    links.write_text(json.dumps({f"{a}>{b}": os.urandom(32).hex()
                                 for a, b in itertools.pairwise(NODES)}))
    missing = f"nx{os.urandom(4).hex()}"
    code = main(["--role", "transit", "--left", missing, "--right", missing + "r",
                 "--spi", str(SPI), "--node", "sf1", "--profile-json", str(profile),
                 "--links-json", str(links)])
    assert code == 2 and "error: opening" in capsys.readouterr().err
    links.write_text("{}")
    with pytest.raises(SystemExit, match="no key for link ingress>sf1"):
        main(["--role", "transit", "--left", "a", "--right", "b", "--spi", "1",
              "--node", "sf1", "--profile-json", str(profile), "--links-json", str(links)])


def test_a_mask_key_wiped_under_a_packet_drops_it_as_unkeyed() -> None:
    # The session's thread retires an epoch while the packet loop holds its MaskKey: the
    # packet is dropped as unkeyed instead of raising out of the loop.
    c = Chain.build()
    stamped = c.sf2.process(c.sf1.process(c.ingress.process(IPV4) or b"") or b"")
    assert stamped is not None
    assert isinstance(c.egress.logic, Egress) and c.egress.logic.upstream is not None
    key = c.egress.logic.upstream.receiving(1)
    assert key is not None
    key.wipe()
    assert c.egress.process(stamped) is None
    assert c.egress.counters == {"no_key": 1}


def test_a_frame_the_step_fails_on_is_counted_and_the_loop_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    c = Chain.build()
    frames = [IPV4, b"boom", IPV4]
    sent: list[bytes] = []

    def receive() -> bytes:
        if not frames:
            raise BlockingIOError
        return frames.pop(0)

    def step(frame: bytes) -> bytes | None:
        if frame == b"boom":
            raise RuntimeError("a bug")
        return c.ingress.process(frame)

    assert c.ingress._drain(receive, lambda f: sent.append(f) or len(f), step) == 3
    assert len(sent) == 2
    assert c.ingress.counters["error"] == 1 and "error" in DROPS
    assert "step failed" in caplog.text
