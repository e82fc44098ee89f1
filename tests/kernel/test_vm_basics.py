"""What every kernel-tier test relies on: ESP and its AEAD in the kernel, namespaces
joined by veths, the repo's libraries, somewhere to write."""

from __future__ import annotations

import platform
import socket
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pyroute2
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qgw.netlab import Lab

InNetns = Callable[[str], AbstractContextManager[None]]


def _proc_crypto_names() -> set[str]:
    return {line.split(":", 1)[1].strip()
            for line in Path("/proc/crypto").read_text().splitlines()
            if line.startswith("name")}


def _modules_present(names: set[str]) -> set[str]:
    loaded = {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}
    builtin = Path(f"/lib/modules/{platform.release()}/modules.builtin").read_text()
    return {name for name in names if name in loaded or f"/{name}.ko" in builtin}


def test_esp_and_xfrm_modules_are_in_the_kernel(kernel_modules: tuple[str, ...]) -> None:
    wanted = {"esp4", "esp6", "xfrm_user", "xfrm_algo", "gcm"}
    assert _modules_present(wanted) == wanted


def test_kernel_gcm_aes_seals_as_cryptography_does(kernel_modules: tuple[str, ...]) -> None:
    key, nonce, aad, plaintext = bytes(range(16)), bytes(range(100, 112)), b"header", b"x" * 45
    with socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0) as alg:
        alg.bind(("aead", "gcm(aes)"))
        alg.setsockopt(socket.SOL_ALG, socket.ALG_SET_KEY, key)
        alg.setsockopt(socket.SOL_ALG, socket.ALG_SET_AEAD_AUTHSIZE, None, 16)
        op, _ = alg.accept()
        with op:
            op.sendmsg_afalg([aad + plaintext], op=socket.ALG_OP_ENCRYPT, iv=nonce,
                             assoclen=len(aad))
            sealed = op.recv(len(aad) + len(plaintext) + 16)
    assert sealed[len(aad):] == AESGCM(key).encrypt(nonce, plaintext, aad)


def test_rfc4106_gcm_aes_seals_an_esp_payload_and_shows_in_proc_crypto(
        kernel_modules: tuple[str, ...]) -> None:
    # ESP's AEAD (RFC 4106): the key ends in a 4-byte salt, the nonce is salt + the
    # packet's 8-byte IV, the AAD is SPI + sequence number; the kernel takes the IV
    # inside the associated data, after the AAD (so assoclen is 8 + 8).
    key, salt, iv = bytes(range(16)), b"\x01\x02\x03\x04", bytes(range(8))
    spi_seq, plaintext = bytes.fromhex("00001234" "00000001"), b"inner ip packet" * 3
    with socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0) as alg:
        alg.bind(("aead", "rfc4106(gcm(aes))"))
        alg.setsockopt(socket.SOL_ALG, socket.ALG_SET_KEY, key + salt)
        alg.setsockopt(socket.SOL_ALG, socket.ALG_SET_AEAD_AUTHSIZE, None, 16)
        op, _ = alg.accept()
        with op:
            op.sendmsg_afalg([spi_seq + iv + plaintext], op=socket.ALG_OP_ENCRYPT, iv=iv,
                             assoclen=len(spi_seq) + len(iv))
            sealed = op.recv(len(spi_seq) + len(iv) + len(plaintext) + 16)
    assert sealed[16:] == AESGCM(key).encrypt(salt + iv, plaintext, spi_seq)
    assert "rfc4106(gcm(aes))" in _proc_crypto_names()


def test_udp_crosses_veths_and_a_bridge_between_namespaces(lab: Lab,
                                                          in_netns: InNetns) -> None:
    lab.setup(["a", "b"])
    with in_netns(lab.namespaces["a"]):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with in_netns(lab.namespaces["b"]):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with client, server:
        client.settimeout(20)  # the first datagram waits for ARP; slow under emulation
        server.settimeout(20)
        server.bind((lab.addresses["b"], 0))
        client.sendto(b"ping-less hello", server.getsockname())
        data, peer = server.recvfrom(100)
        assert (data, peer[0]) == (b"ping-less hello", lab.addresses["a"])
        server.sendto(b"and back", peer)
        assert client.recvfrom(100) == (b"and back", server.getsockname())


def test_the_repo_venv_reaches_netlink_with_its_libraries() -> None:
    assert sys.prefix != sys.base_prefix, "not the repo's .venv interpreter"
    with pyroute2.IPRoute() as ipr:
        names = {link.get_attr("IFNAME") for link in ipr.get_links()}
    assert "lo" in names
    assert len(AESGCM.generate_key(bit_length=256)) == 32


def test_tmp_is_writable(tmp_path: Path) -> None:
    probe = tmp_path / "probe.bin"
    probe.write_bytes(b"\x00written in the VM")
    assert probe.read_bytes() == b"\x00written in the VM"
