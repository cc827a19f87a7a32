"""Certificate authority and server certificates for Strife (CONTRACT §3).

`python -m servers.certs` (re)creates `ca.crt`/`ca.key`, `gateway.crt`/`gateway.key` and one
`<BANK>.crt`/`<BANK>.key` per bank in `banks.json`. Server certificates are valid for `localhost` and
`127.0.0.1`; the common name is `gateway` or the bank's name, which is what a bank checks to know its peer is
the gateway. Private keys are written with mode 0600 and never committed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from servers.config import ConfigError, load_banks

GATEWAY_CN = "gateway"
_VALIDITY = dt.timedelta(days=825)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Strife"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def _make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name("Strife Root CA")).issuer_name(_name("Strife Root CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _make_leaf(cn: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
               ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(san, critical=False)
            # Every Strife process is both a TLS server and (gateway → bank) a client.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def generate(certs_dir: Path, names: list[str]) -> list[Path]:
    """Create a fresh CA and one certificate per name (plus the gateway's). Returns the files written."""
    certs_dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _make_ca()
    _write_key(certs_dir / "ca.key", ca_key)
    _write_cert(certs_dir / "ca.crt", ca_cert)
    written = [certs_dir / "ca.crt", certs_dir / "ca.key"]
    for cn in [GATEWAY_CN, *names]:
        key, cert = _make_leaf(cn, ca_key, ca_cert)
        _write_key(certs_dir / f"{cn}.key", key)
        _write_cert(certs_dir / f"{cn}.crt", cert)
        written += [certs_dir / f"{cn}.crt", certs_dir / f"{cn}.key"]
    return written


def required_files(certs_dir: Path, bank_names: list[str]) -> list[Path]:
    return [certs_dir / f for cn in [GATEWAY_CN, *bank_names] for f in (f"{cn}.crt", f"{cn}.key")] + [
        certs_dir / "ca.crt"]


def ensure(certs_dir: Path, bank_names: list[str]) -> bool:
    """Generate certificates unless every required file exists. Returns True if it generated them."""
    if all(p.is_file() for p in required_files(certs_dir, bank_names)):
        return False
    generate(certs_dir, bank_names)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m servers.certs",
                                     description="(Re)create the Strife CA and every server certificate.")
    parser.add_argument("--config-dir", type=Path, default=Path("config"))
    parser.add_argument("--certs-dir", type=Path, default=Path("certificates"))
    args = parser.parse_args(argv)
    try:
        banks = load_banks(args.config_dir)
    except ConfigError as exc:
        print(f"certs: {exc}", file=sys.stderr)
        return 2
    written = generate(args.certs_dir, sorted(banks))
    print(f"certs: wrote {len(written)} files to {args.certs_dir} (CA, gateway, {', '.join(sorted(banks))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
