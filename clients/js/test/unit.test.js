// Unit tests with a scripted WebSocket (the test plays the server): backoff, reconnect policy,
// reply correlation and timeouts, gap handling, recovery bookkeeping, token refresh.
import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, test } from "node:test";
import { RustySocks, RustySocksError, backoffDelay, PROTOCOL } from "../src/rusty-socks.js";
import { FakeWebSocket, sleep, waitFor } from "./helpers.js";

/** @type {RustySocks[]} */
let clients = [];
function client(options = {}) {
  const c = new RustySocks("ws://fake/ws", { WebSocket: FakeWebSocket, minDelay: 5, maxDelay: 40, timeout: 500, ...options });
  c.on("error", () => {}); // errors are asserted where they matter
  clients.push(c);
  return c;
}
beforeEach(() => FakeWebSocket.reset());
afterEach(() => {
  for (const c of clients) c.close();
  clients = [];
});

/** Connects a client to a fresh fake socket and returns it. */
async function connected(c) {
  const ready = c.connect();
  await waitFor(() => FakeWebSocket.last, { what: "socket" });
  FakeWebSocket.last.accept();
  await ready;
  return FakeWebSocket.last;
}

/** Answers the client's pending subscribe on `ws`. */
function answerSubscribe(ws, channel, reply) {
  const cmd = ws.lastSent("subscribe", channel);
  assert.ok(cmd, `subscribe ${channel} sent`);
  ws.push({ type: "subscribed", id: cmd.id, channel, recovered: false, publications: [], ...reply });
  return cmd;
}

describe("backoffDelay (full jitter)", () => {
  test("stays within [0, min(maxDelay, minDelay * 2^attempt))", () => {
    for (let attempt = 0; attempt < 40; attempt++) {
      const cap = Math.min(10000, 250 * 2 ** attempt);
      assert.equal(backoffDelay(attempt, 250, 10000, () => 0), 0);
      const top = backoffDelay(attempt, 250, 10000, () => 0.999999);
      assert.ok(top < cap && top >= cap * 0.99, `attempt ${attempt}: ${top} vs cap ${cap}`);
      for (let i = 0; i < 50; i++) {
        const d = backoffDelay(attempt, 250, 10000);
        assert.ok(d >= 0 && d < cap, `attempt ${attempt}: ${d} outside [0, ${cap})`);
      }
    }
  });

  test("grows exponentially then saturates at maxDelay", () => {
    const half = (/** @type {number} */ a) => backoffDelay(a, 100, 3000, () => 0.5);
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 50].map(half), [50, 100, 200, 400, 800, 1500, 1500, 1500]);
    assert.equal(backoffDelay(1e6, 100, 3000, () => 0.5), 1500, "huge attempts do not overflow");
  });

  test("is spread over the whole range (full jitter, not equal jitter)", () => {
    const samples = Array.from({ length: 2000 }, () => backoffDelay(10, 250, 10000));
    const below = samples.filter((d) => d < 2500).length;
    const mean = samples.reduce((a, b) => a + b, 0) / samples.length;
    assert.ok(below > 300, `a quarter of the delays fall in the lowest quarter (${below})`);
    assert.ok(mean > 4000 && mean < 6000, `mean ${mean} near half the cap`);
  });
});

describe("connection", () => {
  test("offers the v1 subprotocol and the token, takes clientId from the welcome", async () => {
    const c = client({ token: "aaa.bbb.ccc" });
    const states = [];
    c.on("state", (s) => states.push(s));
    const ws = await connected(c);
    assert.deepEqual(ws.protocols, [PROTOCOL, "token.aaa.bbb.ccc"]);
    assert.equal(c.clientId, "00000000-0000-4000-8000-000000000001");
    assert.equal(c.state, "connected");
    assert.deepEqual(states, ["connecting", "connected"]);
    assert.deepEqual(ws.sent, [], "a v1 connection is on no channel: nothing to leave");
  });

  test("with an older server's `Connect` welcome, leaves `default` and ignores its traffic", async () => {
    const c = client();
    const errors = [];
    c.on("error", (e) => errors.push(e));
    const connecting = c.connect();
    await waitFor(() => FakeWebSocket.instances.length === 1, { what: "socket" });
    const ws = FakeWebSocket.last;
    ws.acceptLegacy("00000000-0000-4000-8000-000000000002");
    await connecting;
    assert.equal(c.clientId, "00000000-0000-4000-8000-000000000002");
    assert.deepEqual(ws.sent, [{ type: "unsubscribe", id: ws.sent[0].id, channel: "default" }]);
    assert.deepEqual(errors, []);
  });

  test("reconnects with backoff delays after drops, calling the token function each time", async () => {
    let tokens = 0;
    const c = client({ minDelay: 4, maxDelay: 20, random: () => 0.5, token: async () => `t${++tokens}` });
    const delays = [];
    c.on("reconnecting", ({ delay }) => delays.push(delay));
    c.connect();
    for (let i = 0; i < 5; i++) {
      await waitFor(() => FakeWebSocket.instances.length === i + 1, { what: `attempt ${i + 1}` });
      FakeWebSocket.last.serverClose(1006);
    }
    await waitFor(() => FakeWebSocket.instances.length === 6, { what: "sixth attempt" });
    assert.deepEqual(delays, [2, 4, 8, 10, 10]);
    assert.deepEqual(FakeWebSocket.instances.map((w) => w.protocols[1]), ["token.t1", "token.t2", "token.t3", "token.t4", "token.t5", "token.t6"]);
    // A successful connection resets the backoff.
    FakeWebSocket.last.accept();
    await waitFor(() => c.state === "connected");
    FakeWebSocket.last.serverClose(1001, "server shutting down");
    await waitFor(() => delays.length === 6);
    assert.equal(delays[5], 2);
  });

  for (const code of [1000, 1001, 1011, 4000, 4001, 4003, 4004]) {
    test(`reconnects after a server close with ${code}`, async () => {
      const c = client();
      const ws = await connected(c);
      ws.serverClose(code);
      await waitFor(() => FakeWebSocket.instances.length === 2, { what: "reconnect" });
    });
  }

  for (const code of [4501, 4500, 4999]) {
    test(`does not reconnect after ${code}, and fails what was waiting`, async () => {
      const c = client();
      const ws = await connected(c);
      const events = [];
      c.on("disconnected", (e) => events.push(e));
      const inFlight = c.publish("room", 1);
      ws.serverClose(code, "disconnected by the server");
      await assert.rejects(inFlight, { code: "disconnected" });
      await sleep(100);
      assert.equal(FakeWebSocket.instances.length, 1);
      assert.equal(c.state, "disconnected");
      assert.deepEqual(events, [{ code, reason: "disconnected by the server", reconnect: false }]);
      await assert.rejects(c.publish("room", 2), { code: "closed" });
    });
  }

  test("close() sends 1000 and does not reconnect; connect() starts again", async () => {
    const c = client();
    const ws = await connected(c);
    c.close();
    assert.equal(ws.closedWith.code, 1000);
    assert.equal(c.state, "disconnected");
    await sleep(60);
    assert.equal(FakeWebSocket.instances.length, 1);
    const again = c.connect();
    await waitFor(() => FakeWebSocket.instances.length === 2);
    FakeWebSocket.last.accept();
    await again;
  });

  test("connect() is rejected by close() while still connecting", async () => {
    const c = client();
    const p = c.connect();
    c.close();
    await assert.rejects(p, { code: "closed" });
  });

  test("a socket that never opens is abandoned after `timeout` and retried", async () => {
    const c = client({ timeout: 50 });
    c.connect();
    await waitFor(() => FakeWebSocket.instances.length >= 2, { what: "retry after connect timeout" });
  });
});

describe("commands", () => {
  test("replies and errors are matched by id, whatever their order", async () => {
    const c = client();
    const ws = await connected(c);
    const a = c.publish("room", { n: 1 });
    const b = c.presence("room");
    const d = c.publish("news:x", { n: 2 });
    const [pa, pb, pd] = ["publish", "presence", "publish"].map((t, i) => ws.sent.filter((f) => f.type === t)[t === "publish" && i === 2 ? 1 : 0]);
    ws.push({ type: "error", id: pd.id, code: "unknown_namespace", message: "namespace \"news\" is not configured" });
    ws.push({ type: "presence", id: pb.id, channel: "room", clients: [{ client_id: "c1", user: null }, { client_id: "c2", user: "u", info: { n: 1 } }] });
    ws.push({ type: "published", id: pa.id, channel: "room", offset: 7 });
    assert.deepEqual(await a, { offset: 7 });
    assert.deepEqual(await b, [{ clientId: "c1", user: null }, { clientId: "c2", user: "u", info: { n: 1 } }]);
    const err = await d.catch((e) => e);
    assert.ok(err instanceof RustySocksError);
    assert.equal(err.code, "unknown_namespace");
    assert.equal(err.channel, "news:x");
  });

  test("commands wait for the connection, and time out without a reply", async () => {
    const c = client({ timeout: 80 });
    c.connect();
    const p = c.publish("room", 1);
    await waitFor(() => FakeWebSocket.last);
    FakeWebSocket.last.accept();
    await waitFor(() => FakeWebSocket.last.lastSent("publish"), { what: "queued publish sent" });
    await assert.rejects(p, { code: "timeout" });
  });

  test("publish before connect() is refused at once", async () => {
    const c = client();
    await assert.rejects(c.publish("room", 1), { code: "closed" });
  });

  test("history passes limit and since, and maps publications", async () => {
    const c = client();
    const ws = await connected(c);
    const p = c.history("room", { limit: 2, since: { offset: 3, epoch: "e" } });
    const cmd = ws.lastSent("history");
    assert.deepEqual(cmd, { type: "history", id: cmd.id, channel: "room", limit: 2, since: { offset: 3, epoch: "e" } });
    ws.push({ type: "history", id: cmd.id, channel: "room", offset: 9, epoch: "e", complete: true, publications: [{ offset: 4, data: "a", client_id: "c1" }, { offset: 5, data: "b" }] });
    assert.deepEqual(await p, {
      channel: "room",
      offset: 9,
      epoch: "e",
      complete: true,
      publications: [
        { channel: "room", offset: 4, epoch: "e", data: "a", clientId: "c1" },
        { channel: "room", offset: 5, epoch: "e", data: "b" },
      ],
    });
  });

  test("a refused subscribe rejects `ready`, calls onError and is removed", async () => {
    const c = client();
    const ws = await connected(c);
    const errors = [];
    const sub = c.subscribe("news:x", { onError: (e) => errors.push(e.code) });
    const cmd = ws.lastSent("subscribe", "news:x");
    ws.push({ type: "error", id: cmd.id, code: "unknown_namespace", message: "no" });
    await assert.rejects(sub.ready, { code: "unknown_namespace" });
    assert.deepEqual(errors, ["unknown_namespace"]);
    assert.equal(sub.state, "unsubscribed");
    assert.equal(c.getSubscription("news:x"), undefined);
  });
});

describe("subscriptions", () => {
  test("delivers in order, drops duplicates and leftovers from before the reply", async () => {
    const c = client();
    const ws = await connected(c);
    const got = [];
    const sub = c.subscribe("room", { onPublication: (p) => got.push(p.offset) });
    ws.push({ type: "publication", channel: "room", offset: 3, data: "old" }); // before the reply
    answerSubscribe(ws, "room", { offset: 4, epoch: "e" });
    assert.deepEqual(await sub.ready, { offset: 4, epoch: "e", recovered: false });
    for (const offset of [5, 6, 6, 5, 7]) ws.push({ type: "publication", channel: "room", offset, data: offset });
    assert.deepEqual(got, [5, 6, 7]);
    assert.deepEqual(sub.position, { offset: 7, epoch: "e" });
  });

  test("subscribed before the first publication: adopts the epoch of the first one and resumes from it", async () => {
    const c = client();
    const ws = await connected(c);
    const got = [];
    const sub = c.subscribe("room", { onPublication: (p) => got.push(`${p.offset}@${p.epoch}`) });
    answerSubscribe(ws, "room", { offset: 0, epoch: "" });
    assert.deepEqual(sub.position, { offset: 0, epoch: "" });
    ws.push({ type: "publication", channel: "room", offset: 1, epoch: "e1", data: 1 });
    ws.push({ type: "publication", channel: "room", offset: 2, epoch: "e1", data: 2 });
    assert.deepEqual(got, ["1@e1", "2@e1"]);
    assert.deepEqual(sub.position, { offset: 2, epoch: "e1" }, "the epoch is taken from the publication");
    // After a reconnect it resumes in that epoch, not in the empty one.
    ws.serverClose(1006);
    await waitFor(() => FakeWebSocket.instances.length === 2);
    const ws2 = FakeWebSocket.last;
    ws2.accept();
    assert.deepEqual(ws2.lastSent("subscribe", "room").since, { offset: 2, epoch: "e1" });
  });

  test("subscribed before the first publication, the first one seen is not offset 1: the rest is fetched", async () => {
    const c = client();
    const ws = await connected(c);
    const got = [];
    const gaps = [];
    const sub = c.subscribe("room", { onPublication: (p) => got.push(`${p.offset}@${p.epoch}`), onGap: (info) => gaps.push(info) });
    answerSubscribe(ws, "room", { offset: 0, epoch: "" });
    ws.push({ type: "publication", channel: "room", offset: 3, epoch: "e1", data: 3 });
    const h = ws.lastSent("history", "room");
    assert.deepEqual(h.since, { offset: 0, epoch: "e1" }, "from the start of the adopted epoch");
    ws.push({ type: "history", id: h.id, channel: "room", offset: 3, epoch: "e1", complete: true, publications: [{ offset: 1, data: 1 }, { offset: 2, data: 2 }, { offset: 3, data: 3 }] });
    assert.deepEqual(got, ["1@e1", "2@e1", "3@e1"]);
    assert.deepEqual(gaps, [{ offset: 0, recovered: true, missed: 3, epochChanged: false }]);
    assert.deepEqual(sub.position, { offset: 3, epoch: "e1" });
  });

  test("a live publication of another epoch (a restart) is never taken as already delivered", async () => {
    const c = client();
    const ws = await connected(c);
    const got = [];
    const gaps = [];
    const sub = c.subscribe("room", { onPublication: (p) => got.push(`${p.offset}@${p.epoch}`), onGap: (info) => gaps.push(info) });
    answerSubscribe(ws, "room", { offset: 5, epoch: "old" });
    ws.push({ type: "publication", channel: "room", offset: 6, epoch: "old", data: 6 });
    // The stream restarted: offset 2 of the new epoch is newer than 6 of the old one.
    ws.push({ type: "publication", channel: "room", offset: 2, epoch: "new", data: "n2" });
    const h = ws.lastSent("history", "room");
    assert.deepEqual(h.since, { offset: 6, epoch: "old" });
    ws.push({ type: "history", id: h.id, channel: "room", offset: 2, epoch: "new", complete: false, publications: [] });
    const h2 = ws.lastSent("history", "room");
    assert.deepEqual(h2.since, { offset: 0, epoch: "new" }, "the new epoch from its start");
    ws.push({ type: "history", id: h2.id, channel: "room", offset: 2, epoch: "new", complete: true, publications: [{ offset: 1, data: "n1" }, { offset: 2, data: "n2" }] });
    ws.push({ type: "publication", channel: "room", offset: 3, epoch: "new", data: "n3" });
    assert.deepEqual(got, ["6@old", "1@new", "2@new", "3@new"]);
    assert.deepEqual(gaps, [{ offset: 6, recovered: false, missed: 2, epochChanged: true }]);
    assert.deepEqual(sub.position, { offset: 3, epoch: "new" });
  });

  test("a late publication of an epoch that is over is dropped after one check, never looping", async () => {
    const c = client();
    const ws = await connected(c);
    const got = [];
    const sub = c.subscribe("room", { onPublication: (p) => got.push(`${p.offset}@${p.epoch}`) });
    answerSubscribe(ws, "room", { offset: 5, epoch: "new" });
    ws.push({ type: "publication", channel: "room", offset: 7, epoch: "old", data: "stale" });
    const histories = () => ws.sent.filter((f) => f.type === "history").length;
    assert.equal(histories(), 1, "the server is asked which epoch is current");
    const h = ws.lastSent("history", "room");
    assert.deepEqual(h.since, { offset: 5, epoch: "new" });
    ws.push({ type: "history", id: h.id, channel: "room", offset: 5, epoch: "new", complete: true, publications: [] });
    await sleep(20);
    assert.equal(histories(), 1, "no second check for the same stale publication");
    ws.push({ type: "publication", channel: "room", offset: 6, epoch: "new", data: 6 });
    assert.deepEqual(got, ["6@new"]);
    assert.deepEqual(sub.position, { offset: 6, epoch: "new" });
  });

  test("resubscribes with since after a reconnect and delivers the recovered ones once", async () => {
    const c = client();
    const ws = await connected(c);
    const got = [];
    const recovered = [];
    c.subscribe("room", { onPublication: (p) => got.push(p.offset), onRecovered: (ok, info) => recovered.push([ok, info.missed]) });
    answerSubscribe(ws, "room", { offset: 0, epoch: "e" });
    ws.push({ type: "publication", channel: "room", offset: 1, data: 1 });
    ws.push({ type: "publication", channel: "room", offset: 2, data: 2 });
    ws.serverClose(1006);
    await waitFor(() => FakeWebSocket.instances.length === 2);
    const ws2 = FakeWebSocket.last;
    ws2.accept("00000000-0000-4000-8000-000000000002");
    assert.equal(c.clientId, "00000000-0000-4000-8000-000000000002");
    const cmd = ws2.lastSent("subscribe", "room");
    assert.deepEqual(cmd.since, { offset: 2, epoch: "e" });
    ws2.push({ type: "subscribed", id: cmd.id, channel: "room", offset: 5, epoch: "e", recovered: true, publications: [{ offset: 2, data: 2 }, { offset: 3, data: 3 }, { offset: 4, data: 4 }, { offset: 5, data: 5 }] });
    ws2.push({ type: "publication", channel: "room", offset: 5, data: 5 });
    ws2.push({ type: "publication", channel: "room", offset: 6, data: 6 });
    assert.deepEqual(got, [1, 2, 3, 4, 5, 6]);
    assert.deepEqual(recovered, [[true, 3]]);
  });

  test("recovered:false is reported, nothing is invented, live ones continue", async () => {
    const c = client();
    const ws = await connected(c);
    const got = [];
    const recovered = [];
    c.subscribe("room", { onPublication: (p) => got.push(p.offset), onRecovered: (ok, info) => recovered.push([ok, info]) });
    answerSubscribe(ws, "room", { offset: 10, epoch: "e" });
    ws.serverClose(4000);
    await waitFor(() => FakeWebSocket.instances.length === 2);
    const ws2 = FakeWebSocket.last;
    ws2.accept();
    answerSubscribe(ws2, "room", { offset: 20, epoch: "e", recovered: false });
    ws2.push({ type: "publication", channel: "room", offset: 21, data: 21 });
    assert.deepEqual(recovered, [[false, { missed: 0, lost: 10, epochChanged: false, offset: 20, epoch: "e" }]]);
    assert.deepEqual(got, [21]);
    assert.equal(ws2.lastSent("history"), undefined, "nothing is fetched: the missed ones are gone");
  });

  test("recovered:false with nothing missed (read_history denied) is not reported as a loss", async () => {
    const c = client();
    const ws = await connected(c);
    const recovered = [];
    c.subscribe("room", { onRecovered: (ok, info) => recovered.push([ok, info.missed, info.lost]) });
    answerSubscribe(ws, "room", { offset: 10, epoch: "e" });
    ws.serverClose(1006);
    await waitFor(() => FakeWebSocket.instances.length === 2);
    const ws2 = FakeWebSocket.last;
    ws2.accept();
    answerSubscribe(ws2, "room", { offset: 10, epoch: "e", recovered: false });
    assert.deepEqual(recovered, [[true, 0, 0]]);
  });

  test("a new epoch on resubscribe (server restart): the new epoch is delivered from its start", async () => {
    const c = client();
    const ws = await connected(c);
    const got = [];
    const events = [];
    const sub = c.subscribe("room", {
      onPublication: (p) => {
        got.push(`${p.offset}/${p.epoch}`);
        events.push("publication");
      },
      onRecovered: (ok, info) => events.push(["recovered", ok, info]),
    });
    answerSubscribe(ws, "room", { offset: 2, epoch: "old" });
    ws.push({ type: "publication", channel: "room", offset: 3, data: 3 });
    ws.serverClose(1006);
    await waitFor(() => FakeWebSocket.instances.length === 2);
    let ws2 = FakeWebSocket.last;
    ws2.accept();
    assert.deepEqual(ws2.lastSent("subscribe", "room").since, { offset: 3, epoch: "old" });
    // Offsets start again at 1: 1 and 2 are new publications, not the old 1 and 2.
    answerSubscribe(ws2, "room", { offset: 2, epoch: "new", recovered: false });
    const h = ws2.lastSent("history", "room");
    assert.deepEqual(h.since, { offset: 0, epoch: "new" });
    // A live one arrives before the history reply: held back, delivered after.
    ws2.push({ type: "publication", channel: "room", offset: 3, data: "n3" });
    assert.deepEqual(got, ["3/old"]);
    // The connection drops before the reply: the next resubscribe resumes in the new epoch,
    // and the epoch change is still reported.
    ws2.serverClose(1006);
    await waitFor(() => FakeWebSocket.instances.length === 3);
    ws2 = FakeWebSocket.last;
    ws2.accept();
    const cmd = ws2.lastSent("subscribe", "room");
    assert.deepEqual(cmd.since, { offset: 0, epoch: "new" });
    ws2.push({ type: "subscribed", id: cmd.id, channel: "room", offset: 3, epoch: "new", recovered: true, publications: [{ offset: 1, data: "n1" }, { offset: 2, data: "n2" }, { offset: 3, data: "n3" }] });
    ws2.push({ type: "publication", channel: "room", offset: 3, data: "n3" });
    ws2.push({ type: "publication", channel: "room", offset: 4, data: "n4" });
    assert.deepEqual(got, ["3/old", "1/new", "2/new", "3/new", "4/new"]);
    assert.deepEqual(events.slice(1), [
      "publication", "publication", "publication",
      ["recovered", false, { missed: 3, lost: null, epochChanged: true, offset: 3, epoch: "new" }],
      "publication",
    ]);
    assert.deepEqual(sub.position, { offset: 4, epoch: "new" });
  });

  test("a new epoch on resubscribe, fetched from history, held-back live ones after it", async () => {
    const c = client();
    const ws = await connected(c);
    const got = [];
    const recovered = [];
    c.subscribe("room", { onPublication: (p) => got.push(`${p.offset}/${p.epoch}`), onRecovered: (ok, info) => recovered.push([ok, info.missed, info.epochChanged, got.length]) });
    answerSubscribe(ws, "room", { offset: 5, epoch: "old" });
    ws.serverClose(1006);
    await waitFor(() => FakeWebSocket.instances.length === 2);
    const ws2 = FakeWebSocket.last;
    ws2.accept();
    answerSubscribe(ws2, "room", { offset: 2, epoch: "new", recovered: false });
    ws2.push({ type: "publication", channel: "room", offset: 3, data: 3 });
    const h = ws2.lastSent("history", "room");
    ws2.push({ type: "history", id: h.id, channel: "room", offset: 3, epoch: "new", complete: true, publications: [{ offset: 1 }, { offset: 2 }, { offset: 3 }] });
    ws2.push({ type: "publication", channel: "room", offset: 4, data: 4 });
    assert.deepEqual(got, ["1/new", "2/new", "3/new", "4/new"]);
    assert.deepEqual(recovered, [[false, 3, true, 3]]);
  });

  test("a new epoch with nothing in it yet: reported at once, live ones from offset 1", async () => {
    const c = client();
    const ws = await connected(c);
    const got = [];
    const recovered = [];
    c.subscribe("room", { onPublication: (p) => got.push(`${p.offset}/${p.epoch}`), onRecovered: (ok, info) => recovered.push([ok, info]) });
    answerSubscribe(ws, "room", { offset: 5, epoch: "old" });
    ws.serverClose(1006);
    await waitFor(() => FakeWebSocket.instances.length === 2);
    const ws2 = FakeWebSocket.last;
    ws2.accept();
    answerSubscribe(ws2, "room", { offset: 0, epoch: "new", recovered: false });
    assert.deepEqual(recovered, [[false, { missed: 0, lost: null, epochChanged: true, offset: 0, epoch: "new" }]]);
    assert.equal(ws2.lastSent("history"), undefined);
    ws2.push({ type: "publication", channel: "room", offset: 1, data: 1 });
    assert.deepEqual(got, ["1/new"]);
  });

  test("a gap push is filled from history (paged), in order, without duplicates", async () => {
    const c = client();
    const ws = await connected(c);
    const got = [];
    const gaps = [];
    c.subscribe("feed", { onPublication: (p) => got.push(p.offset), onGap: (g) => gaps.push(g) });
    answerSubscribe(ws, "feed", { offset: 0, epoch: "e" });
    ws.push({ type: "publication", channel: "feed", offset: 1, data: 1 });
    ws.push({ type: "gap", channel: "feed", offset: 1 });
    const h1 = ws.lastSent("history", "feed");
    assert.deepEqual(h1.since, { offset: 1, epoch: "e" });
    // Live ones after the gap arrive while the history is fetched: held back.
    ws.push({ type: "publication", channel: "feed", offset: 5, data: 5 });
    ws.push({ type: "publication", channel: "feed", offset: 6, data: 6 });
    assert.deepEqual(got, [1]);
    // First page cut by the limit, second page overlaps the live ones.
    ws.push({ type: "history", id: h1.id, channel: "feed", offset: 5, epoch: "e", complete: true, publications: [{ offset: 2, data: 2 }, { offset: 3, data: 3 }] });
    const h2 = ws.lastSent("history", "feed");
    assert.notEqual(h2.id, h1.id);
    assert.deepEqual(h2.since, { offset: 3, epoch: "e" });
    ws.push({ type: "history", id: h2.id, channel: "feed", offset: 5, epoch: "e", complete: true, publications: [{ offset: 4, data: 4 }, { offset: 5, data: 5 }] });
    ws.push({ type: "publication", channel: "feed", offset: 7, data: 7 });
    assert.deepEqual(got, [1, 2, 3, 4, 5, 6, 7]);
    assert.deepEqual(gaps, [{ offset: 1, recovered: true, missed: 4, epochChanged: false }]);
  });

  test("an incomplete history after a gap is reported, and no partial replay is delivered", async () => {
    const c = client();
    const ws = await connected(c);
    const got = [];
    const gaps = [];
    c.subscribe("feed", { onPublication: (p) => got.push(p.offset), onGap: (g) => gaps.push(g) });
    answerSubscribe(ws, "feed", { offset: 1, epoch: "e" });
    ws.push({ type: "gap", channel: "feed", offset: 1 });
    ws.push({ type: "publication", channel: "feed", offset: 9, data: 9 });
    const h = ws.lastSent("history", "feed");
    ws.push({ type: "history", id: h.id, channel: "feed", offset: 9, epoch: "e", complete: false, publications: [{ offset: 8, data: 8 }, { offset: 9, data: 9 }] });
    ws.push({ type: "publication", channel: "feed", offset: 10, data: 10 });
    assert.deepEqual(got, [9, 10]);
    assert.deepEqual(gaps, [{ offset: 1, recovered: false, missed: 0, epochChanged: false }]);
  });

  test("a gap whose history shows a new epoch: the new epoch is fetched from its start", async () => {
    // A networked broker reports a gap when a channel's stream restarts (its history lost), then
    // delivers the new epoch, whose offsets start again at 1.
    const c = client();
    const ws = await connected(c);
    const got = [];
    const gaps = [];
    const sub = c.subscribe("feed", { onPublication: (p) => got.push(`${p.offset}/${p.epoch}`), onGap: (g) => gaps.push(g) });
    answerSubscribe(ws, "feed", { offset: 4, epoch: "old" });
    ws.push({ type: "publication", channel: "feed", offset: 5, data: 5 });
    ws.push({ type: "gap", channel: "feed", offset: 5 });
    ws.push({ type: "publication", channel: "feed", offset: 2, data: "n2" });
    ws.push({ type: "publication", channel: "feed", offset: 3, data: "n3" });
    const h1 = ws.lastSent("history", "feed");
    assert.deepEqual(h1.since, { offset: 5, epoch: "old" });
    ws.push({ type: "history", id: h1.id, channel: "feed", offset: 3, epoch: "new", complete: false, publications: [] });
    const h2 = ws.lastSent("history", "feed");
    assert.notEqual(h2.id, h1.id);
    assert.deepEqual(h2.since, { offset: 0, epoch: "new" });
    ws.push({ type: "history", id: h2.id, channel: "feed", offset: 3, epoch: "new", complete: true, publications: [{ offset: 1 }, { offset: 2 }, { offset: 3 }] });
    ws.push({ type: "publication", channel: "feed", offset: 4, data: "n4" });
    assert.deepEqual(got, ["5/old", "1/new", "2/new", "3/new", "4/new"]);
    assert.deepEqual(gaps, [{ offset: 5, recovered: false, missed: 3, epochChanged: true }]);
    assert.deepEqual(sub.position, { offset: 4, epoch: "new" });
  });

  test("an offset jump in live traffic is treated as a gap", async () => {
    const c = client();
    const ws = await connected(c);
    const got = [];
    c.subscribe("room", { onPublication: (p) => got.push(p.offset) });
    answerSubscribe(ws, "room", { offset: 1, epoch: "e" });
    ws.push({ type: "publication", channel: "room", offset: 4, data: 4 });
    const h = ws.lastSent("history", "room");
    assert.deepEqual(h.since, { offset: 1, epoch: "e" });
    ws.push({ type: "history", id: h.id, channel: "room", offset: 4, epoch: "e", complete: true, publications: [{ offset: 2 }, { offset: 3 }, { offset: 4 }] });
    assert.deepEqual(got, [2, 3, 4]);
  });

  test("join and leave pushes reach the handlers", async () => {
    const c = client();
    const ws = await connected(c);
    const seen = [];
    c.subscribe("chat:x", { onJoin: (cl) => seen.push(["join", cl.clientId]), onLeave: (cl) => seen.push(["leave", cl.clientId, cl.user]) });
    answerSubscribe(ws, "chat:x", { offset: 0, epoch: "e" });
    ws.push({ type: "join", channel: "chat:x", client: { client_id: "a", user: null } });
    ws.push({ type: "leave", channel: "chat:x", client: { client_id: "a", user: "u" } });
    assert.deepEqual(seen, [["join", "a"], ["leave", "a", "u"]]);
  });

  test("a handler that throws does not break delivery", async () => {
    const c = client();
    const errors = [];
    c.on("error", (e) => errors.push(e.message));
    const ws = await connected(c);
    const got = [];
    c.subscribe("room", { onPublication: (p) => { got.push(p.offset); if (p.offset === 1) throw new Error("app bug"); } });
    answerSubscribe(ws, "room", { offset: 0, epoch: "e" });
    ws.push({ type: "publication", channel: "room", offset: 1 });
    ws.push({ type: "publication", channel: "room", offset: 2 });
    assert.deepEqual(got, [1, 2]);
    assert.deepEqual(errors, ["app bug"]);
  });
});

describe("token refresh", () => {
  test("answers a refresh push with a fresh token from the function", async () => {
    let n = 0;
    const c = client({ token: async () => `jwt${++n}` });
    const ws = await connected(c);
    const refreshed = new Promise((resolve) => c.on("refreshed", resolve));
    ws.push({ type: "refresh", expires_at: 123 });
    const cmd = await waitFor(() => ws.lastSent("refresh"), { what: "refresh command" });
    assert.equal(cmd.token, "jwt2");
    ws.push({ type: "refreshed", id: cmd.id, expires_at: 456 });
    assert.deepEqual(await refreshed, { expiresAt: 456 });
  });
});
