"""The certificate generator (CONTRACT §3): each role's certificate names it and has only the usages it needs,
per-process bundles hold no key but their own, files are written whole with keys at 0600, and certificates
that peers would refuse (the old generator's, or mixed from two runs) stop a server or run_all at start with
one line saying what to do."""
from __future__ import annotations

import ipaddress
import shutil
import signal
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from servers import certs as certs_module
from tests.cert_support import impostor_dir, issue, old_style_copy
from tests.harness import OPENING, OPENING_TOTAL, PASSWORDS, REPO, Cluster, free_port, write_config
from wallet_tui.gateway import GrpcGateway

SERVER, CLIENT = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
BANKS = ["AXIS", "HDFC", "SBI"]


def run(args: list[str], timeout: float = 30) -> tuple[int, list[str]]:
    """`python <args>` in the repository, to completion: exit code and non-empty output lines. A command that
    is still running at `timeout` (e.g. a server that started when it should have refused) fails the test."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # run_all stops what it started; a server stops gracefully
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"{args[:2]} was still running after {timeout:g} s:\n{out[-2000:]}")
    return proc.returncode, [line for line in out.splitlines() if line.strip()]


def generate(tmp_path: Path, *extra: str) -> tuple[Path, list[str]]:
    config, certs = tmp_path / "config", tmp_path / "certs"
    write_config(config, {bank: f"localhost:{i + 1}" for i, bank in enumerate(BANKS)})
    code, lines = run(["-m", "servers.certs", "--config-dir", str(config), "--certs-dir", str(certs), *extra])
    assert code == 0, lines
    return certs, lines


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(cert: x509.Certificate, kind: type) -> x509.ExtensionType:
    return cert.extensions.get_extension_for_class(kind).value


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_each_certificate_names_its_role_and_has_only_the_usages_it_needs(tmp_path: Path) -> None:
    certs, _ = generate(tmp_path)
    ca = load(certs / "ca.crt")
    constraints = ext(ca, x509.BasicConstraints)
    assert constraints.ca and constraints.path_length == 0
    assert ext(ca, x509.KeyUsage).key_cert_sign
    for role in ["gateway", *BANKS]:
        cert = load(certs / f"{role}.crt")
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == role
        cert.verify_directly_issued_by(ca)
        assert not ext(cert, x509.BasicConstraints).ca
        usage = ext(cert, x509.KeyUsage)
        assert usage.digital_signature and not usage.key_cert_sign and not usage.key_encipherment
        assert cert.extensions.get_extension_for_class(x509.KeyUsage).critical
        san = ext(cert, x509.SubjectAlternativeName)
        assert san.get_values_for_type(x509.DNSName) == [role, "localhost"]
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        # The gateway serves the wallet and is the banks' client; a bank only serves.
        assert list(ext(cert, x509.ExtendedKeyUsage)) == ([SERVER, CLIENT] if role == "gateway" else [SERVER])
        assert certs_module.identity_problem(certs / f"{role}.crt", (certs / f"{role}.crt").read_bytes(),
                                             (certs / "ca.crt").read_bytes(), role) is None
    assert {p.name: mode(p) for p in certs.glob("*.key")} == {f"{n}.key": 0o600 for n in ["ca", "gateway", *BANKS]}
    assert not [p for p in certs.iterdir() if p.name.endswith(".tmp")]


def test_bundles_hold_the_ca_certificate_and_only_their_own_key(tmp_path: Path) -> None:
    out = tmp_path / "bundles"
    certs, lines = generate(tmp_path, "--bundles", str(out))
    assert str(out) in lines[-1]
    assert {p.name: sorted(f.name for f in p.iterdir()) for p in out.iterdir()} == {
        "wallet": ["ca.crt"], **{r: sorted(["ca.crt", f"{r}.crt", f"{r}.key"]) for r in ["gateway", *BANKS]}}
    assert not list(out.rglob("ca.key"))
    for role in ["gateway", *BANKS]:
        bundle = out / role
        assert mode(bundle / f"{role}.key") == 0o600 and mode(bundle) == 0o700
        for name in ("ca.crt", f"{role}.crt", f"{role}.key"):
            assert (bundle / name).read_bytes() == (certs / name).read_bytes(), name
    assert (out / "wallet" / "ca.crt").read_bytes() == (certs / "ca.crt").read_bytes()
    assert certs_module.dir_problem(certs, BANKS) is None


def test_bundles_are_not_written_into_a_directory_that_holds_another_processes_key(tmp_path: Path) -> None:
    out = tmp_path / "bundles"
    (out / "SBI").mkdir(parents=True)
    (out / "SBI" / "ca.key").write_text("a CA key copied here by hand")
    config = tmp_path / "config"
    write_config(config, {"SBI": "localhost:1", "HDFC": "localhost:2"})
    code, lines = run(["-m", "servers.certs", "--config-dir", str(config), "--certs-dir", str(tmp_path / "certs"),
                       "--bundles", str(out)])
    assert code == 1 and len(lines) == 2 and "ca.key" in lines[1] and "remove it" in lines[1], lines


def test_a_bank_and_the_gateway_each_run_from_their_own_bundle_and_pay(tmp_path: Path) -> None:
    cluster = Cluster(root=tmp_path / "cluster", certs_dir=tmp_path / "bundles" / "gateway")
    certs = tmp_path / "certs"
    code, lines = run(["-m", "servers.certs", "--config-dir", str(cluster.config_dir), "--certs-dir", str(certs),
                       "--bundles", str(tmp_path / "bundles")])
    assert code == 0, lines
    shutil.rmtree(certs)  # the CA key and every other process's key are gone: only the bundles are left
    cluster.process_certs = {name: tmp_path / "bundles" / name for name in ["gateway", *OPENING]}
    try:
        cluster.start()
        wallet = GrpcGateway(f"localhost:{cluster.gateway_port}", tmp_path / "bundles" / "wallet" / "ca.crt")
        try:
            token = wallet.login("alice", PASSWORDS["alice"]).token
            reply = wallet.pay(token, f"bundle-{uuid.uuid4()}", "SBI-1001", "HDFC-2001", 2_500)
        finally:
            wallet.close()
        assert reply.status == "succeeded", reply
        assert cluster.balance("SBI-1001") == 500_000 - 2_500 and cluster.balance("HDFC-2001") == 300_000 + 2_500
        assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0
    finally:
        cluster.stop()


def test_a_stale_temp_file_cannot_widen_a_private_keys_mode(tmp_path: Path) -> None:
    # A run killed between creating its temp file and renaming it leaves the temp file behind; a later run
    # must not inherit its mode (O_CREAT keeps an existing file's mode) and rename a world-readable key in.
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("SBI.key", "ca.key"):
        stale = certs / f"{name}.tmp"
        stale.write_text("half-written")
        stale.chmod(0o644)
    certs_module.generate(certs, ["SBI"])
    assert mode(certs / "SBI.key") == 0o600 and mode(certs / "ca.key") == 0o600
    key = serialization.load_pem_private_key((certs / "SBI.key").read_bytes(), None)  # whole, and the cert's
    assert key.public_key() == load(certs / "SBI.crt").public_key()


@pytest.mark.parametrize("server", ["bank", "gateway"])
def test_a_server_with_certificates_from_the_old_generator_exits_saying_to_regenerate(
        tmp_path: Path, certs_dir: Path, server: str) -> None:
    old = old_style_copy(certs_dir, tmp_path / "old", ["gateway", *OPENING])
    config = tmp_path / "config"
    write_config(config, {bank: f"localhost:{free_port()}" for bank in OPENING})
    module = ["servers.bank_server", "--bank", "SBI"] if server == "bank" else ["servers.gateway_server"]
    code, lines = run(["-m", *module, "--port", str(free_port()), "--config-dir", str(config), "--certs-dir",
                       str(old), "--data-dir", str(tmp_path / "data")], timeout=20)
    assert code == 2 and len(lines) == 1, lines
    role = "SBI" if server == "bank" else "gateway"
    assert f"{role}.crt" in lines[0] and "older certificate generator" in lines[0], lines
    assert "python -m servers.certs" in lines[0], lines


def test_run_all_refuses_old_certificates_in_one_line_and_leaves_them_alone(tmp_path: Path, certs_dir: Path
                                                                           ) -> None:
    old = old_style_copy(certs_dir, tmp_path / "old", ["gateway", *OPENING])
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    config, data = tmp_path / "config", tmp_path / "data"
    write_config(config, {bank: f"localhost:{free_port()}" for bank in OPENING})
    code, lines = run(["run_all.py", "--servers-only", "--config-dir", str(config), "--certs-dir", str(old),
                       "--data-dir", str(data), "--gateway-port", str(free_port())])
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("run_all: cannot start: ") and "python -m servers.certs" in lines[0], lines
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before  # not replaced: the CA may be handed out
    assert not (data / "logs").exists()  # no server was started


def other_ca(tmp_path: Path) -> Path:
    certs_module.generate(tmp_path / "other-ca", ["SBI"])
    return tmp_path / "other-ca"


@pytest.mark.parametrize("case,expected", [
    ("another role's certificate", "SBI.crt names HDFC, localhost, not 'SBI'"),
    ("issued by another CA", "was not signed by the CA in the ca.crt next to it"),
    ("a gateway certificate without clientAuth", "not valid for clientAuth"),
    ("a gateway certificate with another common name", "banks accept only 'gateway'"),
    ("a bank certificate for clients only", "not valid for serverAuth"),
])
def test_certificates_peers_would_refuse_are_named_with_the_reason(tmp_path: Path, certs_dir: Path, case: str,
                                                                   expected: str) -> None:
    work = impostor_dir(certs_dir, tmp_path / "certs", role="gateway", holder="gateway")
    shutil.copy2(certs_dir / "SBI.crt", work / "SBI.crt")
    if case == "another role's certificate":
        shutil.copy2(certs_dir / "HDFC.crt", work / "SBI.crt")
    elif case == "issued by another CA":
        shutil.copy2(other_ca(tmp_path) / "SBI.crt", work / "SBI.crt")
    elif case == "a gateway certificate without clientAuth":
        shutil.copy2(issue(certs_dir, tmp_path / "made", "gateway", dns=("gateway",), usages=(SERVER,)),
                     work / "gateway.crt")
    elif case == "a gateway certificate with another common name":
        shutil.copy2(issue(certs_dir, tmp_path / "made", "strife-gw", dns=("gateway",)), work / "gateway.crt")
    else:
        shutil.copy2(issue(certs_dir, tmp_path / "made", "SBI", dns=("SBI",), usages=(CLIENT,)), work / "SBI.crt")
    problem = certs_module.dir_problem(work, ["SBI"])
    assert problem is not None and expected in problem and "python -m servers.certs" in problem, problem


def test_certificates_made_by_other_tools_with_the_role_names_are_accepted(tmp_path: Path, certs_dir: Path
                                                                         ) -> None:
    work = impostor_dir(certs_dir, tmp_path / "certs", role="gateway", holder="gateway")
    # Another tool's shapes: extra names, no usage restriction, any order; what matters is the role's name.
    shutil.copy2(issue(certs_dir, tmp_path / "made", "SBI", dns=("sbi.bank.internal", "sbi"), usages=()),
                 work / "SBI.crt")
    assert certs_module.dir_problem(work, ["SBI"]) is None
