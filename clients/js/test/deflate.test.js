// Interop: Node's `ws` (which offers permessage-deflate by default) against a compressing server
// (RUSTY_SOCKS_COMPRESSION=true): the extension is negotiated, large messages travel compressed
// both ways, and the v1 client works unchanged over it.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { RustySocks } from "../src/rusty-socks.js";
import { startServer } from "./helpers.js";

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;
const cleanups = [];

before(async () => {
  server = await startServer({ RUSTY_SOCKS_COMPRESSION: "true", RUSTY_SOCKS_ECHO_ENDPOINT: "true" });
});
after(async () => {
  for (const fn of cleanups) fn();
  await server?.stop();
});

/** Opens a `ws` socket; resolves once open. */
function open(url, options = {}) {
  const ws = new WebSocket(url, options);
  cleanups.push(() => ws.terminate());
  ws.once("upgrade", (res) => {
    ws.answered = res.headers["sec-websocket-extensions"] ?? "";
  });
  return new Promise((resolve, reject) => {
    ws.once("open", () => resolve(ws));
    ws.once("error", reject);
  });
}

const nextMessage = (ws) =>
  new Promise((resolve, reject) => {
    ws.once("message", (data, isBinary) => resolve({ data, isBinary }));
    ws.once("close", (code) => reject(new Error(`closed with ${code}`)));
  });

/** About `n` bytes of JSON that compresses like real feeds do. */
const payload = (n) =>
  JSON.stringify({ items: Array.from({ length: Math.ceil(n / 40) }, (_, i) => ({ id: i, name: `item-${i}`, ok: true })) });

describe("permessage-deflate with Node ws", { timeout: 30000 }, () => {
  test("negotiated with both no-context-takeover parameters", async () => {
    const ws = await open(server.httpUrl.replace("http", "ws") + "/echo");
    assert.equal(ws.extensions, "permessage-deflate");
    assert.equal(ws.answered, "permessage-deflate; server_no_context_takeover; client_no_context_takeover");
  });

  test("echo of large text and binary messages, fewer bytes on the wire than the text", async () => {
    const ws = await open(server.httpUrl.replace("http", "ws") + "/echo");
    const text = payload(20000);
    const readBefore = ws._socket.bytesRead;
    ws.send(text);
    const echoed = await nextMessage(ws);
    assert.equal(echoed.isBinary, false);
    assert.equal(echoed.data.toString(), text);
    const read = ws._socket.bytesRead - readBefore;
    assert.ok(read < text.length / 3, `${read} bytes read for ${text.length} bytes of text`);

    const binary = Buffer.from(payload(5000));
    ws.send(binary);
    const back = await nextMessage(ws);
    assert.equal(back.isBinary, true);
    assert.deepEqual(Buffer.from(back.data), binary);

    ws.send("short");
    assert.equal((await nextMessage(ws)).data.toString(), "short");
  });

  test("without the extension offered, the same server speaks plain WebSocket", async () => {
    const ws = await open(server.httpUrl.replace("http", "ws") + "/echo", { perMessageDeflate: false });
    assert.equal(ws.extensions, "");
    const text = payload(2000);
    ws.send(text);
    assert.equal((await nextMessage(ws)).data.toString(), text);
  });

  test("the v1 client publishes and receives large data over compressed connections", async () => {
    const make = () => {
      const c = new RustySocks(server.wsUrl, { WebSocket, minDelay: 20, maxDelay: 200, timeout: 5000 });
      cleanups.push(() => c.close());
      return c;
    };
    const alice = make();
    const bob = make();
    await Promise.all([alice.connect(), bob.connect()]);
    const got = [];
    const sub = bob.subscribe("deflate-room", { onPublication: (p) => got.push(p) });
    await sub.ready;
    const data = JSON.parse(payload(4000));
    await alice.publish("deflate-room", data);
    const deadline = Date.now() + 5000;
    while (got.length < 1 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.equal(got.length, 1);
    assert.deepEqual(got[0].data, data);
  });
});
