#!/usr/bin/env python3
"""A real grpcio server and client for tests/tests/grpc_route.rs.

No generated code: both sides use grpcio's generic API with raw bytes
(no serializers), so what goes through the mesh is exactly what is sent.

    grpc_echo.py serve --name echo-v1
        Serves every method of every service on 127.0.0.1 port 0, prints
        {"port": N} as its first stdout line, and answers each unary call
        with the JSON bytes {"backend": NAME, "method": "/pkg.Svc/M",
        "x_route": <x-route metadata or null>,
        "request": <the request bytes as text>}. Exits when stdin closes
        (the test's end) or on SIGTERM/SIGKILL.

    grpc_echo.py call --target 127.0.0.1:P --authority echo
                      --method /pkg.Svc/Plain --count 200
                      [--metadata x-canary=true ...]
        Makes COUNT unary calls on one channel and prints one JSON line per
        call: {"ok": true, "reply": {...the server's JSON...}} or
        {"ok": false, "code": "UNAVAILABLE", "details": "..."}.
"""

import argparse
import json
import sys
from concurrent import futures

import grpc


class AnyMethod(grpc.GenericRpcHandler):
    """Answers every method with the serving backend's name and what it saw."""

    def __init__(self, name):
        self.name = name

    def service(self, handler_call_details):
        method = handler_call_details.method
        name = self.name

        def unary(request, context):
            md = dict(context.invocation_metadata())
            reply = {
                "backend": name,
                "method": method,
                "x_route": md.get("x-route"),
                "request": request.decode("utf-8", "replace"),
            }
            return json.dumps(reply).encode()

        # No serializers: requests and responses stay bytes.
        return grpc.unary_unary_rpc_method_handler(unary)


def serve(args):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((AnyMethod(args.name),))
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        print(json.dumps({"error": "could not bind 127.0.0.1:0"}), flush=True)
        return 1
    server.start()
    print(json.dumps({"port": port}), flush=True)
    # Runs until the parent closes stdin (or dies).
    sys.stdin.read()
    server.stop(0)
    return 0


def call(args):
    options = [
        # The mesh routes by :authority; the target is the outbound listener.
        ("grpc.default_authority", args.authority),
        # Straight to the listener, whatever *_proxy variables say.
        ("grpc.enable_http_proxy", 0),
        # The test asserts on each call's own outcome.
        ("grpc.enable_retries", 0),
    ]
    metadata = []
    for kv in args.metadata:
        k, _, v = kv.partition("=")
        metadata.append((k, v))
    with grpc.insecure_channel(args.target, options=options) as channel:
        stub = channel.unary_unary(
            args.method, request_serializer=None, response_deserializer=None
        )
        for i in range(args.count):
            try:
                reply = stub(
                    f"call {i}".encode(), metadata=metadata, timeout=args.timeout
                )
                out = {"ok": True, "reply": json.loads(reply)}
            except grpc.RpcError as e:
                out = {"ok": False, "code": e.code().name, "details": e.details()}
            print(json.dumps(out), flush=True)
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    c = sub.add_parser("call")
    c.add_argument("--target", required=True)
    c.add_argument("--authority", required=True)
    c.add_argument("--method", required=True)
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--timeout", type=float, default=10.0)
    c.add_argument("--metadata", action="append", default=[])
    args = p.parse_args()
    return serve(args) if args.mode == "serve" else call(args)


if __name__ == "__main__":
    sys.exit(main())
