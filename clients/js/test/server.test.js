// Integration tests against the real server (spawned here): subscribe/publish, presence,
// history, reply/error correlation, legacy traffic ignored.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { RustySocks } from "../src/rusty-socks.js";
import { startServer, waitFor, sleep } from "./helpers.js";

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;
/** @type {RustySocks[]} */
const clients = [];

function client(options = {}) {
  const c = new RustySocks(server.wsUrl, { WebSocket, minDelay: 20, maxDelay: 200, timeout: 5000, ...options });
  clients.push(c);
  return c;
}

before(async () => {
  server = await startServer();
});
after(async () => {
  for (const c of clients) c.close();
  await server?.stop();
});

describe("against the real server", { timeout: 30000 }, () => {
  test("two clients: subscribe, publish, receive in order with offsets", async () => {
    const alice = client();
    const bob = client();
    await Promise.all([alice.connect(), bob.connect()]);
    assert.match(alice.clientId, /^[0-9a-f-]{36}$/);
    assert.notEqual(alice.clientId, bob.clientId);
    const got = [];
    const sub = bob.subscribe("room-rt", { onPublication: (p) => got.push(p) });
    const ready = await sub.ready;
    assert.deepEqual([ready.offset, ready.epoch], [0, ""], "nothing published yet: no epoch");
    const r1 = await alice.publish("room-rt", { text: "one" });
    const r2 = await alice.publish("room-rt", { text: "two" });
    assert.deepEqual([r1, r2], [{ offset: 1 }, { offset: 2 }]);
    await waitFor(() => got.length === 2, { what: "two publications" });
    // The first publication started the epoch; the subscription took it from there.
    const epoch = got[0].epoch;
    assert.match(epoch, /^[0-9a-f]{12}$/);
    assert.deepEqual(got, [
      { channel: "room-rt", offset: 1, epoch, data: { text: "one" }, clientId: alice.clientId },
      { channel: "room-rt", offset: 2, epoch, data: { text: "two" }, clientId: alice.clientId },
    ]);
    // The publisher gets its own publication when subscribed.
    const mine = [];
    const asub = alice.subscribe("room-rt", { onPublication: (p) => mine.push(p.offset) });
    await asub.ready;
    await alice.publish("room-rt", "three");
    await waitFor(() => mine.length === 1 && got.length === 3, { what: "third publication" });
    assert.deepEqual(mine, [3]);
    assert.deepEqual(sub.position, { offset: 3, epoch });
  });

  test("presence lists the subscribed connections and drops those that leave", async () => {
    const a = client();
    const b = client();
    await Promise.all([a.connect(), b.connect()]);
    await a.subscribe("room-presence").ready;
    const bsub = b.subscribe("room-presence");
    await bsub.ready;
    const ids = (list) => list.map((x) => x.clientId).sort();
    const list = await a.presence("room-presence");
    assert.deepEqual(ids(list), [a.clientId, b.clientId].sort());
    assert.ok(list.every((x) => x.user === null));
    await bsub.unsubscribe();
    assert.deepEqual(ids(await a.presence("room-presence")), [a.clientId]);
    b.close();
  });

  test("history: newest `limit`, and `since` with `complete`", async () => {
    const c = client();
    await c.connect();
    for (let i = 1; i <= 5; i++) await c.publish("room-history", { i });
    const newest = await c.history("room-history", { limit: 2 });
    assert.deepEqual(newest.publications.map((p) => p.data.i), [4, 5]);
    assert.equal(newest.offset, 5);
    const since = await c.history("room-history", { since: { offset: 2, epoch: newest.epoch } });
    assert.equal(since.complete, true);
    assert.deepEqual(since.publications.map((p) => p.offset), [3, 4, 5]);
    const other = await c.history("room-history", { since: { offset: 2, epoch: "not-the-epoch" } });
    assert.equal(other.complete, false);
  });

  test("the README's first examples work on a server with no settings; `chat:lobby` needs a namespace", async () => {
    // `lobby` (default namespace): history and presence on out of the box.
    const a = client();
    const b = client();
    await Promise.all([a.connect(), b.connect()]);
    const got = [];
    const lobby = a.subscribe("lobby", { onPublication: (p) => got.push(p.data.text) });
    await lobby.ready;
    await b.publish("lobby", { text: "hello" });
    await waitFor(() => got.length === 1, { what: "the lobby message" });
    assert.deepEqual(got, ["hello"]);
    assert.deepEqual((await lobby.presence()).map((c) => c.clientId), [a.clientId]);
    assert.deepEqual((await lobby.history({ limit: 10 })).publications.map((p) => p.data.text), ["hello"]);
    // `chat:lobby` without RUSTY_SOCKS_NAMESPACES: refused, as the README says.
    const errors = [];
    const chat = a.subscribe("chat:lobby", { onError: (err) => errors.push(err.code) });
    await assert.rejects(chat.ready, { code: "unknown_namespace" });
    assert.deepEqual(errors, ["unknown_namespace"]);
    // ... and accepted, with join/leave pushes, on a server configured as the README shows.
    const configured = await startServer({ RUSTY_SOCKS_NAMESPACES: '{"chat":{"history_size":100,"join_leave":true}}' });
    try {
      const c = new RustySocks(configured.wsUrl, { WebSocket, timeout: 5000 });
      const d = new RustySocks(configured.wsUrl, { WebSocket, timeout: 5000 });
      clients.push(c, d);
      await Promise.all([c.connect(), d.connect()]);
      const joined = [];
      await c.subscribe("chat:lobby", { onJoin: (who) => joined.push(who.clientId) }).ready;
      await d.subscribe("chat:lobby").ready;
      await waitFor(() => joined.length === 1, { what: "the join push" });
      assert.deepEqual(joined, [d.clientId]);
      await c.subscribe("lobby").ready; // the default namespace is still there
      c.close();
      d.close();
    } finally {
      await configured.stop();
    }
  });

  test("replies and errors are correlated by id when commands overlap", async () => {
    const c = client();
    await c.connect();
    const errors = [];
    const sub = c.subscribe("nope:x", { onError: (e) => errors.push(e.code) });
    const results = await Promise.allSettled([
      c.publish("room-corr", { n: 1 }),
      c.publish("nope:x", { n: 2 }),
      c.presence("room-corr"),
      c.publish("default", { n: 3 }),
      c.history("room-corr"),
      c.publish("bad channel!", 1),
      c.publish("room-corr", { n: 4 }),
    ]);
    const summary = results.map((r) => (r.status === "fulfilled" ? "ok" : r.reason.code));
    assert.deepEqual(summary, ["ok", "unknown_namespace", "ok", "permission_denied", "ok", "invalid_channel", "ok"]);
    assert.deepEqual(results[0].value, { offset: 1 });
    assert.deepEqual(results[6].value, { offset: 2 });
    assert.deepEqual(results[2].value, []);
    assert.deepEqual(results[4].value.publications.map((p) => p.data.n), [1]);
    await assert.rejects(sub.ready, { code: "unknown_namespace" });
    assert.deepEqual(errors, ["unknown_namespace"]);
    assert.equal(results[1].reason.name, "RustySocksError");
    assert.equal(results[1].reason.channel, "nope:x");
  });

  test("the subprotocol is selected: the v1 welcome comes first and no legacy frame follows", async () => {
    const frames = [];
    const errors = [];
    const c = client();
    c.on("message", (m) => frames.push(m.type));
    c.on("error", (e) => errors.push(e));
    let socket;
    const Capture = class extends WebSocket {
      constructor(url, protocols) {
        super(url, protocols);
        socket = this;
      }
    };
    const c2 = client({ WebSocket: Capture });
    await Promise.all([c.connect(), c2.connect()]);
    assert.equal(socket.protocol, "rusty-socks.v1");
    // A legacy client chats on `default`: the v1 clients must not hear it.
    const legacy = new WebSocket(server.wsUrl);
    await new Promise((resolve, reject) => {
      legacy.once("open", resolve);
      legacy.once("error", reject);
    });
    legacy.send(JSON.stringify({ sender: "old", content: "hello legacy" }));
    // Once the chat is stored it has been fanned out; a reply on c after that comes behind
    // anything that could have been queued for it.
    await waitFor(
      async () => (await c.history("default")).publications.some((p) => p.data.content === "hello legacy"),
      { what: "the legacy chat stored" },
    );
    await c.presence("lobby");
    legacy.close();
    assert.equal(frames[0], "welcome");
    assert.match(c.clientId, /^[0-9a-f-]{36}$/);
    assert.deepEqual(
      frames.filter((t) => ["Connect", "Chat", "Disconnect", "Error"].includes(t)),
      [],
      `no legacy frame: ${frames}`,
    );
    assert.deepEqual(errors, []);
    const stats = await (await fetch(`${server.httpUrl}/stats`)).json();
    assert.ok(stats.connections >= 2);
  });
});
