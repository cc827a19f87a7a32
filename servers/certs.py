"""Certificate authority, server certificates and per-process bundles for Strife (CONTRACT §3).

`python -m servers.certs` (re)creates `ca.crt`/`ca.key`, `gateway.crt`/`gateway.key` and one
`<BANK>.crt`/`<BANK>.key` per bank in `banks.json`. With `--bundles OUT_DIR` it also writes one directory per
process holding only what that process needs: `OUT_DIR/<BANK>/` and `OUT_DIR/gateway/` hold `ca.crt` and that
role's own certificate and key, `OUT_DIR/wallet/` holds `ca.crt`. No bundle holds `ca.key`: it stays in
`--certs-dir`, which only the operator who issues certificates needs.

Each leaf names its role (`gateway` or the bank's name) as common name and DNS subject alternative name, next
to `localhost` and `127.0.0.1`. Peers pin that name: the wallet verifies the gateway as `gateway`, the gateway
verifies each bank by its name, and a bank accepts only a client whose common name is `gateway`. Usages
follow the roles: a bank only serves (serverAuth), the gateway serves the wallet and is the banks' client
(serverAuth + clientAuth); BoringSSL refuses a certificate presented for a usage it lacks.

Files are written whole or not at all (a fresh temp file, then `os.replace`); private keys are mode 0600.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from servers.config import ConfigError, load_banks

GATEWAY_CN = "gateway"
WALLET_BUNDLE = "wallet"
_VALIDITY = dt.timedelta(days=825)
_REGENERATE = "run `python -m servers.certs` to recreate the certificates"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Strife"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    # EC keys sign (the TLS handshake, or certificates for the CA); they never encipher.
    return x509.KeyUsage(digital_signature=True, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                         key_agreement=False, encipher_only=False, decipher_only=False)


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` in one step: a reader (or a crash) sees the old file or the new, never part.

    The temp file is new (mkstemp: O_EXCL, 0600), so a stale one left by a killed run can neither widen the
    mode of a key nor be shared by two runs at once."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_atomically(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    write_atomically(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name("Strife Root CA")).issuer_name(_name("Strife Root CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(cn: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, *, client: bool
              ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate for role `cn`; `client` adds clientAuth (only the gateway calls anyone)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName(cn), x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, *([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])]
    cert = (x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(san, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def generate(certs_dir: Path, names: list[str]) -> list[Path]:
    """Create a fresh CA and one certificate per name (plus the gateway's). Returns the files written."""
    certs_dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca()
    _write_key(certs_dir / "ca.key", ca_key)
    _write_cert(certs_dir / "ca.crt", ca_cert)
    written = [certs_dir / "ca.crt", certs_dir / "ca.key"]
    for cn in [GATEWAY_CN, *names]:
        key, cert = make_leaf(cn, ca_key, ca_cert, client=cn == GATEWAY_CN)
        _write_key(certs_dir / f"{cn}.key", key)
        _write_cert(certs_dir / f"{cn}.crt", cert)
        written += [certs_dir / f"{cn}.crt", certs_dir / f"{cn}.key"]
    return written


def write_bundles(certs_dir: Path, out_dir: Path, bank_names: list[str]) -> list[Path]:
    """Copy from `certs_dir` what each process needs into `out_dir/<role>/`; ca.key goes nowhere."""
    written: list[Path] = []
    ca = (certs_dir / "ca.crt").read_bytes()
    for role in [GATEWAY_CN, *bank_names, WALLET_BUNDLE]:
        bundle = out_dir / role
        bundle.mkdir(parents=True, exist_ok=True, mode=0o700 if role != WALLET_BUNDLE else 0o755)
        own = {"ca.crt"} | ({f"{role}.crt", f"{role}.key"} if role != WALLET_BUNDLE else set())
        strays = sorted(p.name for p in bundle.glob("*.key") if p.name not in own)
        if strays:  # e.g. a whole certificates/ copied here before: handing this directory out leaks them
            raise ValueError(f"{bundle} already holds {', '.join(strays)}, which that process must not have; "
                             f"remove {'it' if len(strays) == 1 else 'them'} and run again")
        write_atomically(bundle / "ca.crt", ca, 0o644)
        written.append(bundle / "ca.crt")
        if role != WALLET_BUNDLE:
            for suffix, mode in (("crt", 0o644), ("key", 0o600)):
                target = bundle / f"{role}.{suffix}"
                write_atomically(target, (certs_dir / f"{role}.{suffix}").read_bytes(), mode)
                written.append(target)
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


def _dns_names(cert: x509.Certificate) -> list[str] | None:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                    .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        return None


def _usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier] | None:
    try:
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None  # no EKU extension: any usage


def identity_problem(cert_path: Path, cert_pem: bytes, ca_pem: bytes, role: str, fix: str = _REGENERATE
                     ) -> str | None:
    """Why the certificate at `cert_path` cannot serve as `role` (one line), or None if it can.

    Checks what peers will check, so a server with unusable certificates says so at start instead of
    failing every handshake: the pinned name (as gRPC matches it: a DNS SAN, or the CN if there is no SAN
    extension), the usages the role needs, the gateway's CN (what banks check), and the signature of ca.crt."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        cas = x509.load_pem_x509_certificates(ca_pem)
        common_names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        dns = _dns_names(cert)
        usages = _usages(cert)
    except ValueError as exc:  # not PEM, or an extension that does not parse
        return f"{cert_path} or the ca.crt next to it cannot be read as a certificate ({exc}); {fix}"
    names = dns if dns is not None else common_names
    if role.lower() not in {n.lower() for n in names}:
        if dns is not None and all(n.lower() == "localhost" for n in dns):
            return (f"{cert_path} was made by an older certificate generator: it does not carry the name "
                    f"{role!r}, which peers now verify; {fix}")
        return (f"{cert_path} names {', '.join(names) or 'nothing'}, not {role!r}, which peers verify this "
                f"server as; {fix}")
    needed = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth"}
    if role == GATEWAY_CN:
        needed[ExtendedKeyUsageOID.CLIENT_AUTH] = "clientAuth"  # the gateway is the banks' TLS client
        if GATEWAY_CN not in common_names:
            return (f"{cert_path} has common name {', '.join(common_names) or 'none'}, but banks accept only "
                    f"{GATEWAY_CN!r}; {fix}")
    if usages is not None and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages:
        missing = [label for oid, label in needed.items() if oid not in usages]
        if missing:
            return (f"{cert_path} is not valid for {' and '.join(missing)} (its extended key usage), which "
                    f"{role!r} needs; {fix}")
    # Only a CA of the same name is checked: one that shares the name but not the key means files from two
    # runs of the generator. A chain through an intermediate CA is gRPC's to verify at the handshake.
    issuers = [ca for ca in cas if ca.subject == cert.issuer]
    if issuers and not any(_signed_by(cert, ca) for ca in issuers):
        return (f"{cert_path} was not signed by the CA in the ca.crt next to it (files from two different runs "
                f"of the generator?); {fix}")
    return None


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):  # another key, or a key type it cannot check
        return False
    return True


def dir_problem(certs_dir: Path, bank_names: list[str]) -> str | None:
    """The first reason the server certificates in `certs_dir` cannot be used as they are, or None."""
    ca = (certs_dir / "ca.crt").read_bytes()
    for role in [GATEWAY_CN, *bank_names]:
        path = certs_dir / f"{role}.crt"
        problem = identity_problem(path, path.read_bytes(), ca, role,
                                   f"run `python -m servers.certs --certs-dir {certs_dir}` to recreate them")
        if problem:
            return problem
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m servers.certs",
                                     description="(Re)create the Strife CA and every server certificate.")
    parser.add_argument("--config-dir", type=Path, default=Path("config"))
    parser.add_argument("--certs-dir", type=Path, default=Path("certificates"))
    parser.add_argument("--bundles", type=Path, metavar="OUT_DIR",
                        help="also write one directory per process (gateway, each bank, wallet) holding only "
                             "ca.crt and that process's own certificate and key; run each with --certs-dir "
                             "OUT_DIR/<name>")
    args = parser.parse_args(argv)
    try:
        banks = sorted(load_banks(args.config_dir))
    except ConfigError as exc:
        print(f"certs: {exc}", file=sys.stderr)
        return 2
    written = generate(args.certs_dir, banks)
    print(f"certs: wrote {len(written)} files to {args.certs_dir} (CA, gateway, {', '.join(banks)})")
    if args.bundles is not None:
        try:
            bundled = write_bundles(args.certs_dir, args.bundles, banks)
        except (ValueError, OSError) as exc:
            print(f"certs: cannot write bundles: {exc}", file=sys.stderr)
            return 1
        print(f"certs: wrote {len(bundled)} files to {args.bundles}/{{gateway,{','.join(banks)},wallet}} "
              f"(no CA key in any)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
