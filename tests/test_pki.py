"""`qgw.pki.init_pki`: a CA, KME and SAE certificates, and what a second run keeps and adds."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qgw.errors import PkiError
from qgw.pki import KmeSpec, Pki, SaeSpec, init_pki, kme_dns_name
from qgw.tls import check_key_file


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "pki"
    init_pki(root, [KmeSpec.parse("KME_A=kme-a.example,gw.lab"), KmeSpec.parse("KME_B")],
             [SaeSpec.parse("SAE_1@KME_A"), SaeSpec.parse("SAE_2@KME_B")])
    return root


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def attr(name: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in name.get_attributes_for_oid(oid)]


def sans(c: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        ext = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return ext.get_values_for_type(x509.DNSName), [str(ip) for ip in
                                                   ext.get_values_for_type(x509.IPAddress)]


def every_file(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_ca_is_a_self_signed_ca(root: Path) -> None:
    pki = Pki(root)
    ca = cert(pki.ca_cert)
    assert ca.issuer == ca.subject
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ca.verify_directly_issued_by(ca)
    key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == ca.public_key().public_numbers()  # type: ignore[union-attr]


@pytest.mark.parametrize("kind, name, ou", [("kme", "KME_A", "KME"), ("kme", "KME_B", "KME"),
                                            ("sae", "SAE_1", "SAE"), ("sae", "SAE_2", "SAE")])
def test_leaf_subject_usage_and_issuer(root: Path, kind: str, name: str, ou: str) -> None:
    pki = Pki(root)
    files = pki.kme_files(name) if kind == "kme" else pki.sae_files(name)
    c = cert(files.cert)
    assert attr(c.subject, NameOID.COMMON_NAME) == [name]
    assert attr(c.subject, NameOID.ORGANIZATIONAL_UNIT_NAME) == [ou]
    eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Signed by the CA: the signature checks out with the CA's public key.
    ca = cert(pki.ca_cert)
    assert c.issuer == ca.subject
    c.verify_directly_issued_by(ca)
    # The private key beside it belongs to the certificate.
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == c.public_key().public_numbers()  # type: ignore[union-attr]


def test_leaf_is_not_signed_by_another_ca(root: Path, tmp_path: Path) -> None:
    # Same CA name, other key: only the signature tells them apart.
    other = tmp_path / "other"
    init_pki(other, [KmeSpec.parse("KME_A")], [])
    with pytest.raises(InvalidSignature):
        cert(Pki(root).kme_files("KME_A").cert).verify_directly_issued_by(cert(Pki(other).ca_cert))


def test_kme_san_has_its_names_loopback_and_extra_hosts(root: Path) -> None:
    dns, ips = sans(cert(Pki(root).kme_files("KME_A").cert))
    assert dns == ["kme-a", "localhost", "kme-a.example", "gw.lab"]
    assert {ipaddress.ip_address(i) for i in ips} == {ipaddress.ip_address("127.0.0.1"),
                                                      ipaddress.ip_address("::1")}
    dns, _ = sans(cert(Pki(root).kme_files("KME_B").cert))
    assert dns == ["kme-b", "localhost"]


def test_kme_spec_parse() -> None:
    assert KmeSpec.parse("KME_A").hostnames == ["kme-a", "localhost"]
    # duplicates and empty items are dropped, order kept
    assert KmeSpec.parse("KME_A=h1,,localhost,h2,h1").hostnames == ["kme-a", "localhost",
                                                                    "h1", "h2"]
    assert kme_dns_name("KME_Site_7") == "kme-site-7"


def test_kme_certificate_always_carries_its_dns_name(tmp_path: Path) -> None:
    # KME-to-KME calls verify the peer against kme_dns_name(kme_id), so a KME certificate
    # without that name can never serve a link, however the spec was built.
    init_pki(tmp_path, [KmeSpec("KME_X")], [])
    dns, _ = sans(cert(Pki(tmp_path).kme_files("KME_X").cert))
    assert "kme-x" in dns


def test_private_keys_are_0600(root: Path) -> None:
    keys = sorted(root.rglob("*.key"))
    assert [p.relative_to(root).as_posix() for p in keys] == [
        "admin/operator.key", "ca.key", "kme/KME_A.key", "kme/KME_B.key", "sae/SAE_1.key",
        "sae/SAE_2.key"]
    for p in keys:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        check_key_file(p)


def test_directory_records_sae_to_kme(root: Path) -> None:
    assert Pki(root).directory() == {"SAE_1": "KME_A", "SAE_2": "KME_B"}
    assert yaml.safe_load((root / "directory.yaml").read_text()) == {
        "saes": {"SAE_1": "KME_A", "SAE_2": "KME_B"}}
    assert Pki(root / "nowhere").directory() == {}


def test_second_run_keeps_everything_and_adds_new_saes(root: Path) -> None:
    before = every_file(root)
    report = init_pki(root, [KmeSpec.parse("KME_A"), KmeSpec.parse("KME_C")],
                      [SaeSpec.parse("SAE_1@KME_A"), SaeSpec.parse("SAE_3@KME_B"),
                       SaeSpec.parse("SAE_4@KME_C")])
    assert report.created == ["KME KME_C", "SAE SAE_3", "SAE SAE_4"]
    assert report.kept == ["CA", "KME KME_A", "SAE SAE_1", "operator"]
    after = every_file(root)
    for path, data in before.items():
        if path.name != "directory.yaml":
            assert after[path] == data, path  # bytes unchanged, CA key included
    pki = Pki(root)
    assert pki.directory() == {"SAE_1": "KME_A", "SAE_2": "KME_B", "SAE_3": "KME_B",
                               "SAE_4": "KME_C"}
    ca = cert(pki.ca_cert)
    for name in ("SAE_3", "SAE_4"):
        cert(pki.sae_files(name).cert).verify_directly_issued_by(ca)
        assert stat.S_IMODE(pki.sae_files(name).key.stat().st_mode) == 0o600
    cert(pki.kme_files("KME_C").cert).verify_directly_issued_by(ca)
    # A KME certified earlier counts as a KME for later SAEs, without naming it again.
    init_pki(root, [], [SaeSpec.parse("SAE_5@KME_B")])
    assert pki.directory()["SAE_5"] == "KME_B"


def test_first_run_reports_what_it_created(tmp_path: Path) -> None:
    report = init_pki(tmp_path, [KmeSpec.parse("KME_A")], [SaeSpec.parse("SAE_1@KME_A")])
    assert report.created == ["CA", "KME KME_A", "SAE SAE_1", "operator"] and report.kept == []
    operator = cert(Pki(tmp_path).operator_files().cert)
    assert operator.subject.rfc4514_string() == "CN=operator,OU=ADMIN,O=qkdgw"


def test_sae_of_an_unknown_kme_is_refused(root: Path) -> None:
    before = every_file(root)
    with pytest.raises(PkiError, match="KME_Z"):
        init_pki(root, [], [SaeSpec.parse("SAE_7@KME_Z")])
    assert every_file(root) == before


@pytest.mark.parametrize("text", ["SAE 1@KME_A", "@KME_A", "SAE_1@", "SAE_1", "SAE_1@KME.A",
                                  "../x@KME_A", "SAE/1@KME_A", "x" * 65 + "@KME_A",
                                  "SAE_1@KME_A@KME_B"])
def test_invalid_sae_text_is_refused(text: str) -> None:
    with pytest.raises(PkiError):
        SaeSpec.parse(text)


@pytest.mark.parametrize("text", ["KME A", "KME.A", "KME:A", "-KME", "", "K" * 64])
def test_invalid_kme_id_is_refused(text: str) -> None:
    with pytest.raises(PkiError, match="not valid"):
        KmeSpec.parse(text)


@pytest.mark.parametrize("sae_id", ["../../evil", "SAE 1"])
def test_init_refuses_an_invalid_sae_id_however_the_spec_was_built(
        tmp_path: Path, sae_id: str) -> None:
    root = tmp_path / "deep" / "pki"
    init_pki(root, [KmeSpec.parse("KME_A")], [])
    before = every_file(tmp_path)
    with pytest.raises(PkiError, match="not valid"):
        init_pki(root, [], [SaeSpec(sae_id, "KME_A")])
    assert every_file(tmp_path) == before  # nothing written, inside the folder or outside


def test_sae_moved_to_another_kme_is_refused_and_nothing_changes(root: Path) -> None:
    before = every_file(root)
    with pytest.raises(PkiError, match="already attached to KME_A"):
        init_pki(root, [], [SaeSpec.parse("SAE_8@KME_A"), SaeSpec.parse("SAE_1@KME_B")])
    assert every_file(root) == before  # a refused run issues nothing (no SAE_8 half-added)


def test_check_key_file_refuses_a_key_readable_by_others(root: Path) -> None:
    key = Pki(root).sae_files("SAE_1").key
    for mode in (0o644, 0o640, 0o604, 0o660):
        key.chmod(mode)
        with pytest.raises(PkiError) as info:
            check_key_file(key)
        assert f"chmod 600 {key}" in str(info.value)
        assert f"{mode:o}" in str(info.value)
    key.chmod(0o400)
    check_key_file(key)
    key.chmod(0o600)
    check_key_file(key)


def test_check_key_file_refuses_a_missing_key(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="does not exist"):
        check_key_file(tmp_path / "nope.key")
