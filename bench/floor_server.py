"""The floor: a bare gRPC health server over TLS with no Strife code (one unary round trip per call)."""
from __future__ import annotations

import sys
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def main() -> None:
    certs, port = Path(sys.argv[1]), int(sys.argv[2])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials(
        [((certs / "gateway.key").read_bytes(), (certs / "gateway.crt").read_bytes())]))
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
