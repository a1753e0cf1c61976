#!/usr/bin/env python3
"""WebSocket echo server and client for the mesh tests, built on the
`websockets` library (PyPI).

serve:  listens on 127.0.0.1 (port 0), prints {"port": N}, then one JSON line
        per finished connection ({"path", "close_code", "close_reason"}).
        Paths: /echo echoes every message; /fragments answers how many
        fragments each message arrived in and the joined text; /refuse
        refuses the upgrade with 403 and a body. Exits when stdin closes.
client: connects to --connect HOST:PORT (the node's outbound listener) with
        Host: --host, runs the scenario named by --scenario and prints one
        JSON object with what it saw (`hold`: one echo, a {"ready": true}
        line, then how long until the connection ended).
"""

import argparse
import asyncio
import hashlib
import json
import os
import socket
import sys
import time

import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

MAX = 16 * 1024 * 1024


def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def handler(ws):
    path = ws.request.path
    try:
        if path == "/fragments":
            while True:
                parts = []
                async for frag in ws.recv_streaming():
                    parts.append(frag)
                await ws.send(json.dumps({"fragments": len(parts), "text": "".join(parts)}))
        else:
            async for msg in ws:
                if msg == "close-me":
                    await ws.close(4001, "server says bye")
                    break
                await ws.send(msg)
    except ConnectionClosed:
        pass
    rcvd = ws.protocol.close_rcvd
    say({
        "path": path,
        "close_code": rcvd.code if rcvd else None,
        "close_reason": rcvd.reason if rcvd else None,
    })


def refuse(connection, request):
    if request.path == "/refuse":
        resp = connection.respond(403, "no upgrade for you\n")
        resp.headers["x-refused-by"] = "app"
        return resp
    return None


async def run_server():
    async with serve(handler, "127.0.0.1", 0, max_size=MAX, process_request=refuse,
                     ping_interval=None) as server:
        port = server.sockets[0].getsockname()[1]
        say({"port": port})
        loop = asyncio.get_running_loop()
        # Stop when the test closes our stdin (or dies).
        await loop.run_in_executor(None, sys.stdin.read)


def open_sock(target):
    host, port = target.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


async def client(args):
    uri = f"ws://{args.host}{args.path}"
    out = {}
    if args.scenario == "refuse":
        try:
            async with connect(uri, sock=open_sock(args.connect), proxy=None, open_timeout=20):
                out["opened"] = True
        except InvalidStatus as e:
            out["status"] = e.response.status_code
            out["body"] = e.response.body.decode(errors="replace")
            out["x_refused_by"] = e.response.headers.get("x-refused-by")
            out["shoal_error"] = e.response.headers.get("shoal-error")
        say(out)
        return
    if args.scenario == "hold":
        # One echo, then say so and wait for the connection to end.
        async with connect(uri, sock=open_sock(args.connect), proxy=None, open_timeout=20,
                           ping_interval=None, close_timeout=5) as ws:
            await ws.send("before")
            out["echo"] = await ws.recv()
            say({"ready": True})
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(ws.recv(), 120)
                out["unexpected_message"] = True
            except ConnectionClosed as e:
                out["closed_after_s"] = round(time.monotonic() - t0, 3)
                out["close_code"] = e.rcvd.code if e.rcvd else None
            except asyncio.TimeoutError:
                out["closed_after_s"] = None
        say(out)
        return
    async with connect(uri, sock=open_sock(args.connect), proxy=None, max_size=MAX,
                       open_timeout=20, ping_interval=None, close_timeout=20) as ws:
        out["extensions"] = [type(e).__name__ for e in ws.protocol.extensions]
        if args.scenario in ("full", "small"):
            n = args.messages
            t0 = time.monotonic()
            bad = 0
            for i in range(n):
                msg = f"message {i} " + "x" * (i % 100)
                await ws.send(msg)
                if await ws.recv() != msg:
                    bad += 1
            out["messages"] = n
            out["mismatched"] = bad
            out["echo_seconds"] = round(time.monotonic() - t0, 3)
            # Pipelined: many in flight before reading any answer.
            for i in range(100):
                await ws.send(f"p{i}")
            got = [await ws.recv() for _ in range(100)]
            out["pipelined_in_order"] = got == [f"p{i}" for i in range(100)]
            # Ping / pong.
            t0 = time.monotonic()
            pong = await ws.ping(b"are you there")
            await asyncio.wait_for(pong, 20)
            out["pong_ms"] = round((time.monotonic() - t0) * 1000, 2)
        if args.scenario == "full":
            big = os.urandom(args.big)
            t0 = time.monotonic()
            await ws.send(big)
            back = await asyncio.wait_for(ws.recv(), 60)
            out["big_bytes"] = len(back)
            out["big_equal"] = hashlib.sha256(back).hexdigest() == hashlib.sha256(big).hexdigest()
            out["big_seconds"] = round(time.monotonic() - t0, 3)
        # Close round trip: the server closes with 4001 and its reason.
        await ws.send("close-me")
        try:
            await asyncio.wait_for(ws.recv(), 20)
        except ConnectionClosed as e:
            out["closed_by_server"] = [e.rcvd.code, e.rcvd.reason] if e.rcvd else None
    if args.scenario == "full":
        # Fragments arrive as sent; and a client-side close code reaches the app.
        async with connect(f"ws://{args.host}/fragments", sock=open_sock(args.connect),
                           proxy=None, open_timeout=20, ping_interval=None) as ws:
            parts = [f"part-{i}|" for i in range(7)]
            await ws.send(parts)
            reply = json.loads(await asyncio.wait_for(ws.recv(), 20))
            out["fragments_seen"] = reply["fragments"]
            out["fragments_joined_ok"] = reply["text"] == "".join(parts)
            await ws.close(4002, "client says bye")
            out["client_close_echoed"] = [ws.protocol.close_rcvd.code, ws.protocol.close_rcvd.reason] \
                if ws.protocol.close_rcvd else None
    say(out)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve")
    c = sub.add_parser("client")
    c.add_argument("--connect", required=True)
    c.add_argument("--host", required=True)
    c.add_argument("--path", default="/echo")
    c.add_argument("--scenario", choices=["full", "small", "refuse", "hold"], default="full")
    c.add_argument("--messages", type=int, default=1000)
    c.add_argument("--big", type=int, default=4 * 1024 * 1024)
    args = p.parse_args()
    if args.cmd == "serve":
        asyncio.run(run_server())
    else:
        asyncio.run(client(args))


if __name__ == "__main__":
    sys.stderr.write(f"websockets {websockets.__version__}\n")
    main()
