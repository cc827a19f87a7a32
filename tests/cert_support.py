"""Certificates the generator does not make, for tests: ones signed by a test cluster's CA in other shapes
(the old generator's, a client certificate with another name) and directories where a role's files are
really another role's (an impostor's)."""
from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BOTH_USAGES = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


def issue(certs_dir: Path, out_dir: Path, cn: str, *, dns: tuple[str, ...] = ("localhost",),
          usages: tuple[x509.ObjectIdentifier, ...] = BOTH_USAGES) -> Path:
    """`out_dir/<cn>.crt` and `.key`, signed by the CA in `certs_dir`; the defaults are what the generator
    made before names were pinned (CN only, SAN localhost + 127.0.0.1, serverAuth and clientAuth)."""
    ca_key = serialization.load_pem_private_key((certs_dir / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((certs_dir / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    san = [*(x509.DNSName(d) for d in dns), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Strife"),
                         x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.SubjectAlternativeName(san), critical=False))
    if usages:  # none: no extendedKeyUsage extension, i.e. any usage
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{cn}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (out_dir / f"{cn}.key").chmod(0o600)
    (out_dir / f"{cn}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out_dir / f"{cn}.crt"


def old_style_copy(certs_dir: Path, out_dir: Path, roles: list[str]) -> Path:
    """`certs_dir` as the generator made it before names were pinned: same CA, every leaf CN-only with both
    usages."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("ca.crt", "ca.key"):
        shutil.copy2(certs_dir / name, out_dir / name)
    for role in roles:
        issue(certs_dir, out_dir, role)
    return out_dir


def impostor_dir(certs_dir: Path, out_dir: Path, role: str, holder: str) -> Path:
    """A --certs-dir for `role` whose certificate and key are really `holder`'s (all CA-signed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(certs_dir / "ca.crt", out_dir / "ca.crt")
    shutil.copy2(certs_dir / f"{holder}.crt", out_dir / f"{role}.crt")
    shutil.copy2(certs_dir / f"{holder}.key", out_dir / f"{role}.key")
    return out_dir
