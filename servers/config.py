"""Reading `config/`: users (salted scrypt hashes or plain passwords), banks and opening balances."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servers.money import bank_of, rupees_to_paise

# scrypt parameters: ~20 ms per check on a small machine; slow enough to hurt guessing, fast enough to log in.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


class ConfigError(Exception):
    """A config file that is missing or unusable; the message names the file and the problem."""


@dataclass(frozen=True)
class User:
    username: str
    accounts: tuple[str, ...]
    password_hash: str | None = None
    password: str | None = None
    # Which credential the user has now (see credential_id): a session is valid only while it matches.
    credential: str = ""

    def check_password(self, candidate: str) -> bool:
        if self.password_hash is not None:
            return verify_password(candidate, self.password_hash)
        if self.password is not None:
            return hmac.compare_digest(self.password.encode(), candidate.encode())
        return False


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt)}${b64(digest)}"


def verify_password(candidate: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(candidate.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def credential_id(username: str, password_hash: str | None, password: str | None) -> str:
    """A fingerprint of a user's current credential, stored with each session so that changing the password
    ends the sessions issued before. It must not help anyone who reads the store to guess the password: a
    password hash is salted and slow already, so a digest of it gives nothing away; a plain password is first
    put through the same slow hash (salted with the username, so the result is stable across restarts and
    gateways), so the digest costs a guesser as much as a hashed password would.
    """
    if password_hash is None:
        salt = hashlib.sha256(b"strife-plain-credential\x1f" + username.encode()).digest()[:16]
        password_hash = hash_password(password or "", salt=salt)
    return hashlib.sha256(f"strife-credential\x1f{username}\x1f{password_hash}".encode()).hexdigest()[:32]


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} not found") from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is unreadable: {exc}") from exc


def load_banks(config_dir: Path) -> dict[str, str]:
    """`banks.json` → {bank name: "host:port"}."""
    path = Path(config_dir) / "banks.json"
    raw = _read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected an object of banks, e.g. {{\"SBI\": {{\"address\": \"localhost:50051\"}}}}")
    banks: dict[str, str] = {}
    for name, entry in raw.items():
        address = entry.get("address") if isinstance(entry, dict) else None
        if not isinstance(address, str) or ":" not in address:
            raise ConfigError(f"{path}: bank {name!r} needs an \"address\" of the form host:port")
        try:
            bank_of(f"{name}-1")
        except ValueError as exc:
            raise ConfigError(f"{path}: bank name {name!r} is not usable in account numbers") from exc
        banks[name] = address
    return banks


def load_users(config_dir: Path) -> dict[str, User]:
    path = Path(config_dir) / "users.json"
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected an object of users")
    users: dict[str, User] = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("accounts", []), list):
            raise ConfigError(f"{path}: user {name!r} needs \"accounts\": [...]")
        pw_hash, pw = entry.get("password_hash"), entry.get("password")
        if not isinstance(pw_hash, str) and not isinstance(pw, str):
            raise ConfigError(f"{path}: user {name!r} needs a \"password_hash\" (or \"password\")")
        accounts = tuple(str(a) for a in entry.get("accounts", []))
        for account in accounts:
            try:
                bank_of(account)
            except ValueError as exc:
                raise ConfigError(f"{path}: user {name!r}: {exc}") from exc
        pw_hash, pw = (pw_hash if isinstance(pw_hash, str) else None), (pw if isinstance(pw, str) else None)
        users[name] = User(name, accounts, pw_hash, pw, credential_id(name, pw_hash, pw))
    return users


def load_opening_balances(config_dir: Path, bank: str) -> dict[str, int]:
    """`<BANK>_accounts.json` → {account: paise}. Read only when a bank's ledger is first created."""
    path = Path(config_dir) / f"{bank}_accounts.json"
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected an object of account → opening balance")
    balances: dict[str, int] = {}
    for account, amount in raw.items():
        try:
            if bank_of(account) != bank:
                raise ConfigError(f"{path}: account {account!r} does not belong to bank {bank}")
            balances[account] = 0 if amount == 0 else rupees_to_paise(float(amount), maximum=10**15)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: account {account!r}: {exc}") from exc
    return balances


def main(argv: list[str] | None = None) -> int:
    """`python -m servers.config hash-password`: print a hash for users.json (reads the password from stdin)."""
    import getpass
    import sys
    password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
