#!/usr/bin/env python3
"""Interop: Python `websockets` (which offers permessage-deflate by default) against a compressing
Rusty Socks server. Starts the server binary given as the first argument on a free loopback port
with RUSTY_SOCKS_COMPRESSION=true and the echo endpoint, then checks that

- the extension is negotiated with server_no_context_takeover and client_no_context_takeover,
- large text and binary messages echo back intact, with fewer bytes read than the text,
- a v1 publication of about 1 KiB reaches a compressing subscriber,
- a client that does not offer the extension still talks plain WebSocket.

Usage: deflate_websockets.py PATH/TO/rusty_socks   (needs `pip install websockets`)
"""

import asyncio
import json
import os
import re
import subprocess
import sys

import websockets
from websockets.asyncio.client import connect

WAIT = 10


def start_server(binary):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUSTY_SOCKS_")}
    env.update(
        RUSTY_SOCKS_HOST="127.0.0.1",
        RUSTY_SOCKS_PORT="0",
        RUSTY_SOCKS_COMPRESSION="true",
        RUSTY_SOCKS_ECHO_ENDPOINT="true",
        RUST_LOG="info",
        NO_COLOR="1",
    )
    proc = subprocess.Popen([binary], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", re.sub(r"\x1b\[[0-9;]*m", "", line))
        if m:
            return proc, int(m.group(1))
    proc.kill()
    raise SystemExit("server exited before listening")


def payload(n):
    return json.dumps({"items": [{"id": i, "name": f"item-{i}", "ok": True} for i in range(n // 40 + 1)]})


def read_bytes(ws):
    """Bytes read so far from the connection's socket (the transport counts nothing, so ask
    the kernel-facing wrapper we installed)."""
    return ws.transport.counted


def count_reads(ws):
    # Wrap the protocol's data_received to count wire bytes as they arrive.
    transport = ws.transport
    transport.counted = 0
    protocol = transport.get_protocol()
    original = protocol.data_received

    def counting(data):
        transport.counted += len(data)
        original(data)

    protocol.data_received = counting


async def main(port):
    base = f"ws://127.0.0.1:{port}"
    async with connect(base + "/echo", max_size=None) as ws:
        answer = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert answer == "permessage-deflate; server_no_context_takeover; client_no_context_takeover", answer
        count_reads(ws)
        text = payload(20000)
        await ws.send(text)
        echoed = await asyncio.wait_for(ws.recv(), WAIT)
        assert echoed == text
        assert read_bytes(ws) < len(text) / 3, (read_bytes(ws), len(text))
        data = payload(5000).encode()
        await ws.send(data)
        assert await asyncio.wait_for(ws.recv(), WAIT) == data
        await ws.send("short")
        assert await asyncio.wait_for(ws.recv(), WAIT) == "short"

    async with connect(base + "/echo", compression=None) as ws:
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        text = payload(2000)
        await ws.send(text)
        assert await asyncio.wait_for(ws.recv(), WAIT) == text

    v1 = ["rusty-socks.v1"]
    async with connect(base + "/ws", subprotocols=v1) as sub, connect(base + "/ws", subprotocols=v1) as pub:
        for ws in (sub, pub):
            welcome = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            assert welcome["type"] == "welcome", welcome
        await sub.send(json.dumps({"type": "subscribe", "id": 1, "channel": "py"}))
        assert json.loads(await asyncio.wait_for(sub.recv(), WAIT))["type"] == "subscribed"
        data = json.loads(payload(1000))
        await pub.send(json.dumps({"type": "publish", "id": 2, "channel": "py", "data": data}))
        assert json.loads(await asyncio.wait_for(pub.recv(), WAIT))["type"] == "published"
        publication = json.loads(await asyncio.wait_for(sub.recv(), WAIT))
        assert publication["type"] == "publication" and publication["data"] == data, publication
    print(f"websockets {websockets.__version__}: 3 passed, 0 failed")


if __name__ == "__main__":
    server, port = start_server(sys.argv[1])
    try:
        asyncio.run(main(port))
    finally:
        server.terminate()
        server.wait(10)
