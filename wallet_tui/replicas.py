"""The gateway as a list of replicas (CONTRACT §9): `--gateway a:p,b:q` parsed, turned into one gRPC channel
target that gRPC's `round_robin` balances over, with client-side health checking, and the rule for when a call
that lost its replica is sent again at once to another.

Why gRPC's own balancer and not one channel per replica: round_robin with `healthCheckConfig` keeps a health
*watch* open to every replica, so a replica that says NOT_SERVING (draining) or whose connection drops leaves
the rotation within one round trip, and rejoins by itself when it answers again; a call is only ever given to a
replica that is connected and SERVING, and fails at once with UNAVAILABLE when none is. Doing that by hand
would mean a watch thread per replica and a picker of our own. No extra package or channel option is needed:
gRPC's C core runs the health watch whenever the service config asks for it (`grpc.inhibit_health_checking`
would turn it off), over the standard `grpc.health.v1.Health/Watch` that every Strife server serves.
"""
from __future__ import annotations

import ipaddress
import json
import socket

import grpc

SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},   # "" = the server as a whole, which every Strife server sets
})


# A call that lost its replica did not get an answer (the connection dropped, or the replica is gone or going);
# another replica may give one, so the call is sent again at once. The gateway's own UNAVAILABLE (its store or a
# bank unreachable) is worth one try elsewhere too. Every resend carries the request's idempotency key, so a
# payment the lost replica had started is replayed or finished by the next one, never paid twice (CONTRACT §5).
LOST_REPLICA = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# After a lost replica, the next one may answer ABORTED: the key is still owned by the replica that died, until
# the store knows it is dead (at once with SQLite's flock, within moments with PostgreSQL). A few short pauses
# bridge that; if it lasts longer the payment stays pending and the outbox resends it (CONTRACT §8).
ABORTED_PAUSES = (0.05, 0.1, 0.2, 0.4, 0.8)


def failover_pause(code: grpc.StatusCode, lost: int, aborted: int, replicas: int) -> float | None:
    """A try of a call just failed with `code`: seconds to wait before sending it again, or None to give up and
    report the error. `lost`: tries of this call so far that lost their replica; `aborted`: tries answered
    ABORTED after one did (both counting this one).

    One gateway: never (as before replicas: resends are the outbox's business). Several: a lost replica is
    followed at once by another try, up to one per replica and one more (the balancer may hand out a replica
    that has just died before it has noticed)."""
    if replicas < 2:
        return None
    if code in LOST_REPLICA:
        return 0.0 if lost <= replicas else None
    if code is grpc.StatusCode.ABORTED and lost and aborted <= len(ABORTED_PAUSES):
        return ABORTED_PAUSES[aborted - 1]
    return None


def parse_gateways(value: str) -> tuple[str, ...]:
    """`"a:1, b:2"` → `("a:1", "b:2")`. Raises ValueError naming the entry that is wrong: an empty entry, one
    that is not HOST:PORT with a port 1-65535, or one listed twice."""
    entries = [part.strip() for part in value.split(",")]
    seen: dict[str, str] = {}
    for entry in entries:
        if not entry:
            raise ValueError(f"empty entry in {value!r}: expected HOST:PORT[,HOST:PORT...]")
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT (port 1-65535), not {entry!r}")
        bracketed = host.startswith("[") and host.endswith("]")
        if host.startswith("[") != host.endswith("]") or (":" in host and not bracketed):
            raise ValueError(f"an IPv6 address is written [ADDRESS]:PORT, not {entry!r}")
        same = f"{host.lower()}:{int(port)}"
        if same in seen:
            raise ValueError(f"{entry!r} is listed twice (as {seen[same]!r}); list each gateway once")
        seen[same] = entry
    return tuple(entries)


def channel_target(addresses: tuple[str, ...]) -> str:
    """The target of the one channel to all replicas.

    One address stays exactly what it was (gRPC resolves the name itself, `pick_first`). Several: gRPC's target
    syntax names one host at most, so the names are resolved here, into an `ipv4:`/`ipv6:` list of addresses
    (a name's IPv4 addresses when it has any: the servers listen on 0.0.0.0). A name that does not resolve is
    left out; the wallet resolves again whenever no replica answers (`GrpcGateway.health`). If none resolves,
    the first entry is returned as it is, so that calls fail with gRPC's own "DNS resolution failed" reason."""
    if len(addresses) == 1:
        return addresses[0]
    endpoints: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        for ip in _resolve(host.strip("[]"), int(port)):
            if (ip, int(port)) not in endpoints:  # `localhost:1` and `127.0.0.1:1` are one replica
                endpoints.append((ip, int(port)))
    if not endpoints:
        return addresses[0]
    if all(ip.version == 4 for ip, _ in endpoints):
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in endpoints)
    # Mixed families: one target has one scheme, and an IPv6 socket reaches IPv4 through a mapped address.
    return "ipv6:" + ",".join(f"[{_as_v6(ip)}]:{port}" for ip, port in endpoints)


def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
            if ip not in found:
                found.append(ip)
    v4 = [ip for ip in found if ip.version == 4]
    return list(v4) if v4 else found


def _as_v6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return ip if isinstance(ip, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{ip}")
