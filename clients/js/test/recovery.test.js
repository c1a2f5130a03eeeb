// Reconnect and recovery against the real server, with a TCP proxy that cuts the connection.
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import WebSocket from "ws";
import { RustySocks } from "../src/rusty-socks.js";
import { nextEvent, startServer, startTcpProxy, waitFor, sleep } from "./helpers.js";

const cleanups = [];
after(async () => {
  for (const fn of cleanups.reverse()) await fn();
});

/**
 * A server, a proxy in front of it, a `roaming` client behind the proxy and a `publisher`
 * connected directly.
 */
async function setup(env = {}) {
  const server = await startServer(env);
  cleanups.push(() => server.stop());
  const proxy = await startTcpProxy(server.port);
  cleanups.push(() => proxy.close());
  const roaming = new RustySocks(proxy.wsUrl, { WebSocket, minDelay: 20, maxDelay: 150, timeout: 5000 });
  const publisher = new RustySocks(server.wsUrl, { WebSocket, timeout: 5000 });
  cleanups.push(() => {
    roaming.close();
    publisher.close();
  });
  await Promise.all([roaming.connect(), publisher.connect()]);
  return { server, proxy, roaming, publisher };
}

/** Cuts the roaming client's connection and keeps it out until `letIn()` is called. */
async function cut(proxy, roaming) {
  proxy.block(true);
  const disconnected = nextEvent(roaming, "disconnected");
  proxy.drop();
  const event = await disconnected;
  assert.equal(event.reconnect, true);
  assert.equal(roaming.state, "connecting");
  // Let it fail to reconnect at least once while the network is "down".
  await nextEvent(roaming, "reconnecting");
  return () => proxy.block(false);
}

describe("reconnect and recovery", { timeout: 30000 }, () => {
  test("after a network drop it reconnects and gets every missed publication once, in order", async () => {
    const { proxy, roaming, publisher } = await setup();
    const got = [];
    const recovered = [];
    const states = [];
    roaming.on("state", (s) => states.push(s));
    const sub = roaming.subscribe("room-recover", {
      onPublication: (p) => got.push(p),
      onRecovered: (ok, info) => recovered.push({ ok, missed: info.missed }),
    });
    await sub.ready;
    const firstId = roaming.clientId;
    for (let i = 1; i <= 3; i++) await publisher.publish("room-recover", { i });
    await waitFor(() => got.length === 3, { what: "the first three" });

    const letIn = await cut(proxy, roaming);
    // While it is away: the server has noticed the broken connection (presence is empty)...
    await waitFor(async () => (await publisher.presence("room-recover")).length === 0, { what: "presence emptied" });
    // ... and publications go on.
    for (let i = 4; i <= 8; i++) await publisher.publish("room-recover", { i });
    letIn();
    await waitFor(() => recovered.length === 1, { what: "recovery" });
    assert.deepEqual(recovered, [{ ok: true, missed: 5 }]);
    assert.equal(roaming.state, "connected");
    assert.notEqual(roaming.clientId, firstId);
    // Live traffic continues after the recovered ones.
    await publisher.publish("room-recover", { i: 9 });
    await waitFor(() => got.length >= 9, { what: "the ninth" });
    await sleep(100);
    assert.deepEqual(got.map((p) => p.offset), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert.deepEqual(got.map((p) => p.data.i), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert.deepEqual(states.slice(0, 1), ["connecting"]);
    assert.equal(states.at(-1), "connected");
    const present = await publisher.presence("room-recover");
    assert.deepEqual(present.map((c) => c.clientId), [roaming.clientId]);
  });

  test("publications racing the drop are neither lost nor doubled", async () => {
    const { proxy, roaming, publisher } = await setup();
    const got = [];
    await roaming.subscribe("room-race", { onPublication: (p) => got.push(p.offset) }).ready;
    const burst = (from, to) => Promise.all(Array.from({ length: to - from + 1 }, (_, k) => publisher.publish("room-race", { i: from + k })));
    const publishing = burst(1, 40);
    await sleep(2);
    proxy.drop(); // not blocked: it reconnects at once, possibly mid-burst
    await publishing;
    await burst(41, 50);
    await waitFor(() => got.length >= 50, { what: "fifty publications" });
    await sleep(100);
    assert.deepEqual(got, Array.from({ length: 50 }, (_, k) => k + 1));
  });

  test("recovered:false when history cannot cover the absence; nothing is invented", async () => {
    const { proxy, roaming, publisher } = await setup({ RUSTY_SOCKS_NAMESPACES: '{"":{"history_size":2}}' });
    const got = [];
    const recovered = [];
    const sub = roaming.subscribe("room-lossy", {
      onPublication: (p) => got.push(p.offset),
      onRecovered: (ok, info) => recovered.push({ ok, missed: info.missed }),
    });
    await sub.ready;
    await publisher.publish("room-lossy", { i: 1 });
    await waitFor(() => got.length === 1);

    const letIn = await cut(proxy, roaming);
    await waitFor(async () => (await publisher.presence("room-lossy")).length === 0, { what: "presence emptied" });
    for (let i = 2; i <= 6; i++) await publisher.publish("room-lossy", { i });
    letIn();
    await waitFor(() => recovered.length === 1, { what: "recovery answer" });
    assert.deepEqual(recovered, [{ ok: false, missed: 0 }]);
    assert.deepEqual(got, [1], "no missed publication delivered");
    assert.equal(sub.offset, 6, "the position moved to the server's");
    await publisher.publish("room-lossy", { i: 7 });
    await waitFor(() => got.length === 2);
    assert.deepEqual(got, [1, 7]);
  });
});

describe("gap (slow consumer on a `gap` namespace)", { timeout: 30000 }, () => {
  test("a gap push is filled from history: every publication once, in order", async () => {
    const { proxy, roaming, publisher } = await setup({
      RUSTY_SOCKS_NAMESPACES: '{"":{},"feed":{"slow_policy":"gap","history_size":1000,"history_ttl_s":0}}',
      RUSTY_SOCKS_BUFFER: "4",
      RUSTY_SOCKS_HISTORY_BYTES: String(64 << 20),
    });
    const got = [];
    const gaps = [];
    await roaming.subscribe("feed:big", { onPublication: (p) => got.push(p.offset), onGap: (g) => gaps.push(g) }).ready;
    // The roaming client stops reading (its socket buffers fill up, then its outbox): the
    // server drops publications for it and sends a `gap`.
    proxy.pauseUpstream();
    const pad = "x".repeat(16000);
    const total = 900;
    for (let i = 1; i <= total; i += 50) {
      await Promise.all(Array.from({ length: Math.min(50, total - i + 1) }, (_, k) => publisher.publish("feed:big", { i: i + k, pad })));
    }
    proxy.resumeUpstream();
    await waitFor(() => got.length >= total, { what: `${total} publications`, timeout: 20000 });
    await sleep(100);
    assert.ok(gaps.length >= 1, "the server reported a gap");
    assert.ok(gaps.every((g) => g.recovered), JSON.stringify(gaps));
    assert.deepEqual(got, Array.from({ length: total }, (_, k) => k + 1));
    assert.equal(roaming.state, "connected", "no disconnect: the gap policy kept the connection");
  });
});
