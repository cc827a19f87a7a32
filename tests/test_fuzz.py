"""Hostile input, fuzzed (hypothesis), against ONE real cluster: every RPC of the gateway (Login,
ProcessPayment, GetBalance, ListPayments) and of the banks (Prepare, Commit, Abort, GetBalance, called with the
gateway's certificate) gets random and hostile values — huge strings, unicode, bytes that are not UTF-8 or not
a message at all, NaN/inf/negative/overflowing/subnormal amounts, malformed and oversized metadata, oversized
messages, tokens of other users.

Every call must end in a clear status (a response, or a gRPC status that is not UNKNOWN or INTERNAL), every
server must stay up and healthy, and no money may move except by a payment that was legitimately valid: the
module keeps a ledger of what each succeeded payment moved and checks the banks' ledgers on disk against it
after every example (money conserved, no hold left behind).
"""
from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protofiles import payment_pb2 as pb
from tests.harness import (OPENING, OPENING_TOTAL, PASSWORDS, USER_ACCOUNTS, Client, Cluster,
                           certs_module_client_credentials, health_ok, wait_until)

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None)  # one cluster, one history: replaying a stored example would see other state
UNCLEAR = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
OVER_4MB = 5 * 1024 * 1024
ALL_ACCOUNTS = sorted(a for accounts in OPENING.values() for a in accounts)


# ---- the cluster, and what it must still hold ------------------------------------------------------------------
@dataclass
class Books:
    """What the ledgers must show: the opening balances plus every payment the gateway said succeeded."""
    balances: dict[str, int] = field(default_factory=lambda: {
        a: int(round(v * 100)) for accounts in OPENING.values() for a, v in accounts.items()})
    paid: set[str] = field(default_factory=set)  # transaction ids already applied (replays move nothing)

    def record(self, response: pb.PaymentResponse, from_account: str, to_account: str) -> None:
        if response.status != pb.PAYMENT_STATUS_SUCCEEDED:
            assert not response.success
            return
        assert response.success and response.transaction_id
        assert (response.from_account, response.to_account) == (from_account, to_account)
        if response.transaction_id not in self.paid:
            assert not response.replayed
            self.paid.add(response.transaction_id)
            self.balances[from_account] -= response.amount_paise
            self.balances[to_account] += response.amount_paise


@dataclass(repr=False)
class Fuzzed:
    cluster: Cluster
    clients: dict[str, Client]
    books: Books
    banks: dict[str, Any]  # bank → BankStub with the gateway's certificate, one channel each
    gateway_channel: grpc.Channel
    bank_channel: grpc.Channel  # SBI, with the gateway's certificate

    def __repr__(self) -> str:  # hypothesis prints the fixture with every falsifying example
        return f"Fuzzed(cluster at {self.cluster.root})"

    def channel(self, method: str) -> grpc.Channel:
        """The channel a raw call of `method` goes over."""
        return self.bank_channel if method.startswith("/Bank/") else self.gateway_channel

    def check(self) -> None:
        """Still up, nothing held, and every balance exactly what the succeeded payments say."""
        for name, proc in self.cluster.procs.items():
            assert proc.alive, f"{name} died:\n{proc.log()[-3000:]}"
        wait_until(lambda: self.cluster.holds() == 0, 10, message="no hold left behind")
        assert {a: b for a, (b, _) in self.cluster.accounts().items()} == self.books.balances
        assert self.cluster.total() == OPENING_TOTAL


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path) -> Iterator[Fuzzed]:
    # Login limits out of the way: this module checks that every answer is clear and that only the right
    # password gets in, over many wrong logins from one address (tests/test_login_limits.py tests the limits).
    cluster = Cluster(root=tmp_path_factory.mktemp("fuzz"), certs_dir=certs_dir,
                      gateway_args=["--login-failures-per-user", "100000", "--login-failures-per-peer", "100000"]
                      ).start()
    try:
        clients = {user: cluster.client(user) for user in ("alice", "bob")}
        banks = {bank: cluster.bank_stub(bank) for bank in OPENING}
        bank_channel = grpc.secure_channel(f"localhost:{cluster.bank_ports['SBI']}",
                                           certs_module_client_credentials(certs_dir, "gateway"))
        yield Fuzzed(cluster, clients, Books(), banks, cluster.channel(), bank_channel)
        bank_channel.close()
        # Afterwards: healthy, and still doing its job.
        creds = grpc.ssl_channel_credentials((certs_dir / "ca.crt").read_bytes())
        assert health_ok(f"localhost:{cluster.gateway_port}", creds)
        for bank in OPENING:
            cluster.wait_bank(bank)
    finally:
        cluster.stop()


def outcome(call: Callable[[], Any], metadata: list[tuple[str, str]] | None = None
            ) -> tuple[grpc.StatusCode | None, Any]:
    """(OK, response) or (status, details); fails the test on an unclear status.

    (None, …) when the client library refused to send the metadata at all (gRPC checks it locally and says
    INTERNAL "Invalid metadata" without contacting the server): nothing reached a server.
    """
    if metadata is not None and not sendable(metadata):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.INTERNAL and "metadata" in refused.value.details()
        return None, "refused by the client library"
    try:
        return grpc.StatusCode.OK, call()
    except grpc.RpcError as exc:
        assert exc.code() not in UNCLEAR, f"unclear status {exc.code()}: {exc.details()}"
        return exc.code(), exc.details()


# ---- what hostile values look like -----------------------------------------------------------------------------
INTERESTING = ["", " ", "\x00", "SBI-1001\n", "SBI-1001\x00", " SBI-1001", "sbi-1001", "SBI-", "-1001", "SBI--1001",
               "SBI-１００１", "ＳＢＩ-1001", "SBI-1001-1", "SBI-" + "9" * 40, "X" * 33 + "-1", "NOBANK-1",
               "'; DROP TABLE accounts; --", "%s%n%x", "\u202eSBI-1001", "SBI-1001\u200b", "🙂-1001", "\ufeff",
               "HDFC-2001 ", "HDFC-2001\r\n"]
texts = st.one_of(
    st.sampled_from(INTERESTING),
    st.text(max_size=60),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=8).map(lambda s: s * 20_000),  # huge
    st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3),  # surrogates: not encodable
)
accounts = st.one_of(st.sampled_from(ALL_ACCOUNTS), texts)
valid_amounts = st.integers(1, 500).map(lambda paise: paise / 100)  # ₹0.01 … ₹5.00: money may move
amounts = st.one_of(
    valid_amounts,
    st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 2.2250738585072014e-308,
                     1.7976931348623157e308, -1.0, -0.01, 0.001, 1.005, 0.1 + 0.2, 100_000_000.01, 2.0 ** 53,
                     2.0 ** 63, 9.3e18, 1e-7]),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
)


def encodable(*values: str) -> bool:
    """Protobuf cannot carry a lone surrogate: the client refuses it before anything is sent."""
    try:
        for value in values:
            value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")


def sendable(metadata: list[tuple[str, str]]) -> bool:
    """What gRPC lets a client put on the wire (it refuses anything else locally, with INTERNAL)."""
    return all(_METADATA_KEY.fullmatch(k) and all(" " <= ch <= "~" for ch in v) for k, v in metadata)


@st.composite
def authorization(draw: st.DrawFn, fuzzed_clients: dict[str, Client], user: str
                  ) -> tuple[list[tuple[str, str]], str | None]:
    """Metadata carrying some authorization, and whose session it really names (None: nobody's)."""
    other = "bob" if user == "alice" else "alice"
    mode = draw(st.sampled_from(["own", "own-lowercase", "other", "none", "garbage", "huge", "basic", "empty"]))
    token = fuzzed_clients[user].token
    if mode == "own":
        return [("authorization", f"Bearer {token}")], user
    if mode == "own-lowercase":
        return [("authorization", f"bearer {token}")], user
    if mode == "other":
        return [("authorization", f"Bearer {fuzzed_clients[other].token}")], other
    if mode == "none":
        return [], None
    if mode == "huge":
        return [("authorization", "Bearer " + "x" * draw(st.integers(400, 20_000)))], None
    if mode == "basic":
        return [("authorization", f"Basic {token}")], None
    if mode == "empty":
        return [("authorization", "")], None
    return [("authorization", draw(st.text(max_size=80)))], None


AUTH_FAILURES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}


# ---- the gateway -----------------------------------------------------------------------------------------------
@given(data=st.data(), user=st.sampled_from(["alice", "bob"]),
       hostile=st.sets(st.sampled_from(["auth", "key", "from", "to", "amount"])),
       key_mode=st.sampled_from(["metadata", "field", "both", "none", "hostile-metadata", "hostile-field", "10k",
                                 "two", "reuse"]),
       hostile_key=texts)
@FUZZ
def test_fuzzed_process_payment_is_clear_and_moves_only_valid_money(
        fuzzed: Fuzzed, data: st.DataObject, user: str, hostile: set[str], key_mode: str, hostile_key: str) -> None:
    # A valid payment of `user`'s, with the fields named in `hostile` replaced by fuzz: so that valid payments
    # (which must move exactly their amount) are common, and so is every mix of valid and hostile fields.
    own = USER_ACCOUNTS[user]
    from_account = data.draw(accounts if "from" in hostile else st.sampled_from(own), label="from")
    to_account = data.draw(accounts if "to" in hostile else
                           st.sampled_from([a for a in ALL_ACCOUNTS if a != from_account]), label="to")
    amount = data.draw(amounts if "amount" in hostile else valid_amounts, label="amount")
    if "auth" in hostile:
        md, who = data.draw(authorization(fuzzed.clients, user), label="authorization")
    else:
        md, who = fuzzed.clients[user].md(), user
    if "key" not in hostile:
        key_mode = "metadata"
    key = f"fuzz-{uuid.uuid4()}"
    txn_field = ""
    if key_mode in ("metadata", "both"):
        md.append(("idempotency-key", key))
    if key_mode in ("field", "both"):
        txn_field = key
    if key_mode == "hostile-metadata":
        md.append(("idempotency-key", hostile_key))
    if key_mode == "hostile-field":
        txn_field = hostile_key
    if key_mode == "10k":
        md.append(("idempotency-key", "k" * 10_000))
    if key_mode == "two":
        md += [("idempotency-key", key), ("idempotency-key", key + "-2")]
    if key_mode == "reuse":
        md.append(("idempotency-key", "fuzz-reused-key"))  # same key, other parameters → FAILED_PRECONDITION
    if not encodable(*(value for _, value in md if isinstance(value, str))):
        with pytest.raises(UnicodeEncodeError):  # gRPC cannot put a lone surrogate in metadata: nothing is sent
            fuzzed.clients[user].stub.ProcessPayment(pb.PaymentRequest(amount=1.0), metadata=md, timeout=15)
        fuzzed.check()
        return
    if not encodable(from_account, to_account, txn_field):
        with pytest.raises(ValueError):  # UnicodeEncodeError: protobuf cannot carry a lone surrogate
            pb.PaymentRequest(transaction_id=txn_field, from_account=from_account, to_account=to_account)
        return
    code, reply = outcome(lambda: fuzzed.clients[user].stub.ProcessPayment(
        pb.PaymentRequest(transaction_id=txn_field, from_account=from_account, to_account=to_account,
                          amount=amount), metadata=md, timeout=15), md)
    if code is None:
        fuzzed.check()
        return
    allowed = AUTH_FAILURES | {grpc.StatusCode.INVALID_ARGUMENT}
    if who is not None:
        allowed |= {grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION}
    assert code in allowed, (code, reply)
    if code == grpc.StatusCode.OK:
        assert from_account in USER_ACCOUNTS[who] and to_account in ALL_ACCOUNTS and from_account != to_account
        assert reply.amount_paise == round(amount * 100)
        fuzzed.books.record(reply, from_account, to_account)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        assert from_account not in USER_ACCOUNTS[who]  # another user's token never pays from this account
    fuzzed.check()


@given(data=st.data(), user=st.sampled_from(["alice", "bob"]),
       username=st.one_of(st.sampled_from(["", "alice", "bob", "carol"]), texts))
@FUZZ
def test_fuzzed_get_balance_is_clear_and_shows_only_the_callers_own(fuzzed: Fuzzed, data: st.DataObject,
                                                                   user: str, username: str) -> None:
    md, who = data.draw(authorization(fuzzed.clients, user), label="authorization")
    if not encodable(username):
        with pytest.raises((UnicodeEncodeError, ValueError)):
            pb.GatewayBalanceRequest(username=username)
        return
    code, reply = outcome(lambda: fuzzed.clients[user].stub.GetBalance(
        pb.GatewayBalanceRequest(username=username), metadata=md, timeout=10), md)
    if code is None:
        pass
    elif who is None:
        assert code in AUTH_FAILURES, (code, reply)
    elif username not in ("", who):
        assert code == grpc.StatusCode.PERMISSION_DENIED, (code, reply)
    else:
        assert code == grpc.StatusCode.OK, (code, reply)
        assert {d.account: d.balance_paise for d in reply.details} == {
            a: fuzzed.books.balances[a] for a in USER_ACCOUNTS[who]}
    fuzzed.check()


@given(data=st.data(), user=st.sampled_from(["alice", "bob"]), limit=st.integers(-(2 ** 31), 2 ** 31 - 1))
@FUZZ
def test_fuzzed_list_payments_is_clear(fuzzed: Fuzzed, data: st.DataObject, user: str, limit: int) -> None:
    md, who = data.draw(authorization(fuzzed.clients, user), label="authorization")
    code, reply = outcome(lambda: fuzzed.clients[user].stub.ListPayments(
        pb.ListPaymentsRequest(limit=limit), metadata=md, timeout=10), md)
    if code is None:
        pass
    elif who is None:
        assert code in AUTH_FAILURES, (code, reply)
    elif limit < 0:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, reply)
    else:
        assert code == grpc.StatusCode.OK, (code, reply)
        assert len(reply.payments) <= min(limit or 50, 500)
    fuzzed.check()


@given(username=st.one_of(st.sampled_from(list(PASSWORDS)), texts),
       password=st.one_of(st.sampled_from(list(PASSWORDS.values())), texts))
@FUZZ
def test_fuzzed_login_is_clear_and_admits_only_the_right_password(fuzzed: Fuzzed, username: str,
                                                                  password: str) -> None:
    if not encodable(username, password):
        with pytest.raises((UnicodeEncodeError, ValueError)):
            pb.LoginRequest(username=username, password=password)
        return
    code, reply = outcome(lambda: fuzzed.clients["alice"].stub.Login(
        pb.LoginRequest(username=username, password=password), timeout=10))
    if PASSWORDS.get(username) == password:
        assert code == grpc.StatusCode.OK and reply.token and list(reply.accounts) == USER_ACCOUNTS[username]
    else:
        assert code == grpc.StatusCode.UNAUTHENTICATED, (code, reply)


# ---- the banks (with the gateway's certificate: the only caller they answer) -----------------------------------
@given(bank=st.sampled_from(sorted(OPENING)), txn=st.one_of(st.builds(lambda: f"fuzz-{uuid.uuid4()}"), texts),
       from_account=accounts, to_account=accounts, amount=amounts)
@FUZZ
def test_fuzzed_bank_prepare_is_clear_and_a_yes_holds_only_until_abort(
        fuzzed: Fuzzed, bank: str, txn: str, from_account: str, to_account: str, amount: float) -> None:
    if not encodable(txn, from_account, to_account):
        return
    stub = fuzzed.banks[bank]
    code, vote = outcome(lambda: stub.Prepare(pb.PrepareRequest(transaction_id=txn, from_account=from_account,
                                                                to_account=to_account, amount=amount), timeout=10))
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, vote)
    if code == grpc.StatusCode.OK and vote.vote:
        # A legitimately valid Prepare holds money; the coordinator's Abort must give it all back.
        assert amount > 0 and bank in (from_account.split("-")[0], to_account.split("-")[0])
        ack = stub.Abort(pb.AbortRequest(transaction_id=txn), timeout=10)
        assert ack.success, ack.message
    elif code == grpc.StatusCode.OK:
        assert vote.reason
    fuzzed.check()


@given(bank=st.sampled_from(sorted(OPENING)), txn=texts, method=st.sampled_from(["Commit", "Abort"]))
@FUZZ
def test_fuzzed_bank_commit_and_abort_are_clear_and_move_nothing(fuzzed: Fuzzed, bank: str, txn: str,
                                                                method: str) -> None:
    if not encodable(txn):
        return
    stub = fuzzed.banks[bank]
    request = (pb.CommitRequest if method == "Commit" else pb.AbortRequest)(transaction_id=txn)
    code, ack = outcome(lambda: getattr(stub, method)(request, timeout=10))
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, ack)
    if code == grpc.StatusCode.OK and method == "Commit":
        assert not ack.success  # nothing fuzzed was ever prepared and left open
    fuzzed.check()


@given(bank=st.sampled_from(sorted(OPENING)), account=accounts)
@FUZZ
def test_fuzzed_bank_get_balance_is_clear_and_true(fuzzed: Fuzzed, bank: str, account: str) -> None:
    if not encodable(account):
        return
    code, reply = outcome(lambda: fuzzed.banks[bank].GetBalance(
        pb.BankBalanceRequest(account_number=account), timeout=10))
    if account in OPENING[bank]:
        assert code == grpc.StatusCode.OK and reply.balance_paise == fuzzed.books.balances[account]
        assert reply.available_paise == reply.balance_paise  # no hold is ever left behind
    else:
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), (code, reply)


# ---- bytes that are not a message, and messages above the 4 MB limit -------------------------------------------
GATEWAY_METHODS = ["/PaymentGateway/Login", "/PaymentGateway/ProcessPayment", "/PaymentGateway/GetBalance",
                   "/PaymentGateway/ListPayments"]
BANK_METHODS = ["/Bank/Prepare", "/Bank/Commit", "/Bank/Abort", "/Bank/GetBalance"]
RESPONSES: dict[str, Callable[[bytes], Any]] = {
    "/PaymentGateway/ProcessPayment": pb.PaymentResponse.FromString, "/Bank/Prepare": pb.Vote.FromString}
NOT_UTF8 = [b"\x0a\x02\xff\xfe", b"\x12\x03\xed\xa0\x80", b"\x0a\x01\xc0"]  # a string field: invalid UTF-8 / surrogate


def raw_call(fuzzed: Fuzzed, method: str, raw: bytes, metadata: list[tuple[str, str]] | None = None
             ) -> tuple[grpc.StatusCode, Any]:
    call = fuzzed.channel(method).unary_unary(method, request_serializer=lambda b: b,
                               response_deserializer=RESPONSES.get(method, lambda b: b))
    return outcome(lambda: call(raw, metadata=metadata, timeout=15))


@given(method=st.sampled_from(GATEWAY_METHODS + BANK_METHODS),
       raw=st.one_of(st.binary(max_size=200), st.sampled_from(NOT_UTF8)))
@FUZZ
def test_fuzzed_raw_bytes_get_a_clear_status_on_every_method(fuzzed: Fuzzed, method: str, raw: bytes) -> None:
    """What a non-Python client (or an attacker) can send: any bytes at all as the request message."""
    key = f"fuzz-raw-{uuid.uuid4()}"
    metadata = None if method.startswith("/Bank/") else fuzzed.clients["alice"].md(key)
    code, reply = raw_call(fuzzed, method, raw, metadata)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND), (code, reply)
    if code == grpc.StatusCode.OK and method == "/PaymentGateway/ProcessPayment":
        request = pb.PaymentRequest.FromString(raw)  # the bytes happened to be a valid payment of alice's
        fuzzed.books.record(reply, request.from_account, request.to_account)
    if code == grpc.StatusCode.OK and method == "/Bank/Prepare" and reply.vote:
        request = pb.PrepareRequest.FromString(raw)
        assert fuzzed.banks["SBI"].Abort(pb.AbortRequest(transaction_id=request.transaction_id),
                                                     timeout=10).success
    fuzzed.check()


@pytest.mark.parametrize("method", GATEWAY_METHODS + BANK_METHODS)
def test_a_message_above_4mb_is_resource_exhausted(fuzzed: Fuzzed, method: str) -> None:
    # Field 15, length-delimited: unknown to every request message, so the bytes are otherwise a valid message.
    payload = b"\x7a" + _varint(OVER_4MB) + b"x" * OVER_4MB
    metadata = None if method.startswith("/Bank/") else fuzzed.clients["alice"].md(f"fuzz-big-{uuid.uuid4()}")
    code, details = raw_call(fuzzed, method, payload, metadata)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    fuzzed.check()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_regression_malformed_request_bytes_are_invalid_argument(fuzzed: Fuzzed) -> None:
    """Bytes that are not a valid request message (truncated, or a string field that is not UTF-8) used to get
    INTERNAL "Exception deserializing request!" from gRPC itself; they are the caller's fault: INVALID_ARGUMENT,
    after authentication, with the call logged like any other."""
    for method in GATEWAY_METHODS + BANK_METHODS:
        metadata = None if method.startswith("/Bank/") else fuzzed.clients["alice"].md("fuzz-malformed")
        not_utf8 = [] if method.endswith("ListPayments") else [b"\x0a\x02\xff\xfe", b"\x0a\x03\xed\xa0\x80"]
        for raw in [b"\xff\xff\xff", b"\x0a\x05ab", *not_utf8]:  # garbage, truncated, field 1 not UTF-8
            code, details = raw_call(fuzzed, method, raw, metadata)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, raw, code, details)
    code, _ = raw_call(fuzzed, "/PaymentGateway/ListPayments", b"\xff\xff\xff", [])  # no token: auth comes first
    assert code == grpc.StatusCode.UNAUTHENTICATED
    wait_until(lambda: "status=INVALID_ARGUMENT" in fuzzed.cluster.procs["gateway"].log(), 5,
               message="the refusals' log lines")
    fuzzed.check()


def test_servers_still_work_after_the_fuzzing(fuzzed: Fuzzed) -> None:
    """Last in the module: a valid payment still succeeds and moves exactly its amount."""
    alice = fuzzed.clients["alice"]
    response = alice.pay(f"fuzz-after-{uuid.uuid4()}", "SBI-1001", "HDFC-2001", 1.23)
    assert response.status == pb.PAYMENT_STATUS_SUCCEEDED
    fuzzed.books.record(response, "SBI-1001", "HDFC-2001")
    fuzzed.check()
