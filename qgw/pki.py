"""A small PKI for a simulated QKD network: one CA, a certificate per KME and per SAE.

Layout of a PKI folder:

    ca.pem, ca.key            the CA (key 0600)
    kme/<KME_ID>.pem|.key     server+client certificate, CN=KME ID, OU=KME,
                              SAN: its host names, localhost, 127.0.0.1
    sae/<SAE_ID>.pem|.key     client+server certificate, CN=SAE ID, OU=SAE
    directory.yaml            which KME each SAE is attached to

Running `init` again on an existing folder keeps the CA and every existing
certificate and issues only what is missing, so SAEs can be added later.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qgw.errors import PkiError
from qgw.tls import ROLE_ADMIN, ROLE_KME, ROLE_SAE, TlsFiles, write_private

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
# A KME ID must also make a DNS label: its certificate names it as one (see kme_dns_name).
KME_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
CA_DAYS = 3650
LEAF_DAYS = 825


def check_id(kind: str, value: str) -> str:
    if kind == "KME":
        if not KME_ID_PATTERN.match(value):
            raise PkiError(f"KME ID {value!r} is not valid: use 1-63 letters, digits, '_' or '-'")
    elif not ID_PATTERN.match(value):
        raise PkiError(
            f"{kind} ID {value!r} is not valid: use 1-64 letters, digits, '_', '.', ':' or '-'"
        )
    return value


def kme_dns_name(kme_id: str) -> str:
    """The DNS name every certificate of a KME carries: KME_A -> kme-a.

    KME-to-KME calls verify the peer's certificate against this name (TLS
    server_hostname), whatever address the link URL uses, so the certificate
    of another KME at the same address is refused.
    """
    return kme_id.lower().replace("_", "-")


def default_hostnames(kme_id: str) -> list[str]:
    """KME_A is reachable as kme-a (its compose service name) and localhost."""
    return list(dict.fromkeys([kme_dns_name(kme_id), "localhost"]))


@dataclass
class KmeSpec:
    kme_id: str
    hostnames: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> KmeSpec:
        """`KME_A` or `KME_A=host1,10.0.0.5` (extra DNS names or IP addresses)."""
        kme_id, _, hosts = text.partition("=")
        check_id("KME", kme_id)
        extra = [h for h in hosts.split(",") if h]
        return cls(kme_id, list(dict.fromkeys(default_hostnames(kme_id) + extra)))


@dataclass(frozen=True)
class SaeSpec:
    sae_id: str
    kme_id: str

    @classmethod
    def parse(cls, text: str) -> SaeSpec:
        """`SAE_1@KME_A`."""
        sae_id, sep, kme_id = text.partition("@")
        if not sep:
            raise PkiError(f"SAE {text!r} must name its KME: SAE_ID@KME_ID")
        return cls(check_id("SAE", sae_id), check_id("KME", kme_id))


@dataclass
class Pki:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    def kme_files(self, kme_id: str) -> TlsFiles:
        return TlsFiles(self.ca_cert, self.root / "kme" / f"{kme_id}.pem",
                        self.root / "kme" / f"{kme_id}.key")

    def operator_files(self) -> TlsFiles:
        """The network operator's client certificate (KME admin calls: `qgw kme link|status`)."""
        return TlsFiles(self.ca_cert, self.root / "admin" / "operator.pem",
                        self.root / "admin" / "operator.key")

    def sae_files(self, sae_id: str) -> TlsFiles:
        return TlsFiles(self.ca_cert, self.root / "sae" / f"{sae_id}.pem",
                        self.root / "sae" / f"{sae_id}.key")

    def directory(self) -> dict[str, str]:
        """SAE ID -> KME ID, as recorded by `init`."""
        path = self.root / "directory.yaml"
        if not path.exists():
            return {}
        data = yaml.safe_load(path.read_text()) or {}
        return dict(data.get("saes", {}))


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str, ou: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qkdgw")]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _make_ca(pki: Pki, name: str) -> None:
    key = _new_key()
    subject = _name(name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pki.root.mkdir(parents=True, exist_ok=True)
    write_private(pki.ca_key, _key_pem(key))
    pki.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(pki: Pki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot load the CA in {pki.root}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{pki.ca_key} is not an EC key")
    return cert, key


def _issue(pki: Pki, files: TlsFiles, cn: str, role: str, hostnames: list[str]) -> None:
    ca_cert, ca_key = _load_ca(pki)
    key = _new_key()
    sans: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    if role == ROLE_KME:
        sans += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                 x509.IPAddress(ipaddress.ip_address("::1"))]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, role))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_agreement=True, key_cert_sign=False,
                crl_sign=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        # Both usages: KMEs call each other, and gateway pairs use SAE certificates
        # on both ends of their control channel.
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    files.cert.parent.mkdir(parents=True, exist_ok=True)
    write_private(files.key, _key_pem(key))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@dataclass
class InitReport:
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def init_pki(root: Path, kmes: list[KmeSpec], saes: list[SaeSpec],
             ca_name: str = "qkdgw simulated QKD network CA") -> InitReport:
    """Create (or complete) a PKI folder. Returns what was created and what was kept."""
    pki = Pki(Path(root))
    report = InitReport()
    for kme in kmes:
        check_id("KME", kme.kme_id)
    kme_ids = {k.kme_id for k in kmes} | set(_existing(pki, "kme"))
    directory = pki.directory()
    # Every check before the first file is written: a refused init changes nothing.
    for sae in saes:
        check_id("SAE", sae.sae_id)
        if sae.kme_id not in kme_ids:
            raise PkiError(f"SAE {sae.sae_id} is attached to {sae.kme_id}, which is not a KME here "
                           f"(add --kme {sae.kme_id})")
        known = directory.get(sae.sae_id)
        if known and known != sae.kme_id:
            raise PkiError(f"SAE {sae.sae_id} is already attached to {known}, not {sae.kme_id}")
    if pki.ca_cert.exists():
        report.kept.append("CA")
    else:
        _make_ca(pki, ca_name)
        report.created.append("CA")
    for kme in kmes:
        files = pki.kme_files(kme.kme_id)
        if files.cert.exists():
            report.kept.append(f"KME {kme.kme_id}")
            continue
        hostnames = list(dict.fromkeys(default_hostnames(kme.kme_id) + kme.hostnames))
        _issue(pki, files, kme.kme_id, ROLE_KME, hostnames)
        report.created.append(f"KME {kme.kme_id}")
    for sae in saes:
        files = pki.sae_files(sae.sae_id)
        directory[sae.sae_id] = sae.kme_id
        if files.cert.exists():
            report.kept.append(f"SAE {sae.sae_id}")
            continue
        _issue(pki, files, sae.sae_id, ROLE_SAE, [])
        report.created.append(f"SAE {sae.sae_id}")
    operator = pki.operator_files()
    if operator.cert.exists():
        report.kept.append("operator")
    else:
        _issue(pki, operator, "operator", ROLE_ADMIN, [])
        report.created.append("operator")
    (pki.root / "directory.yaml").write_text(
        yaml.safe_dump({"saes": dict(sorted(directory.items()))}, sort_keys=False)
    )
    return report


def _existing(pki: Pki, kind: str) -> list[str]:
    folder = pki.root / kind
    return sorted(p.stem for p in folder.glob("*.pem")) if folder.exists() else []
