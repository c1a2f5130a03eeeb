// A server restart against the real server: the in-memory server starts every channel again at
// offset 1 under a new epoch, so positions from before the restart mean nothing after it.
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import WebSocket from "ws";
import { RustySocks } from "../src/rusty-socks.js";
import { nextEvent, restartServer, startServer, startTcpProxy, waitFor } from "./helpers.js";

const cleanups = [];
after(async () => {
  for (const fn of cleanups.reverse()) await fn();
});

describe("server restart (new epoch)", { timeout: 60000 }, () => {
  test("publications of the new epoch reach everyone, the late one too, once each, in order", async () => {
    let server = await startServer();
    cleanups.push(() => server.stop());
    const port = server.port;
    // `early` reconnects as soon as the server is back; `late` is kept out (by a proxy) until
    // `early` has published in the new epoch.
    const proxy = await startTcpProxy(port);
    cleanups.push(() => proxy.close());
    const early = new RustySocks(server.wsUrl, { WebSocket, minDelay: 20, maxDelay: 200, timeout: 5000 });
    const late = new RustySocks(proxy.wsUrl, { WebSocket, minDelay: 20, maxDelay: 200, timeout: 5000 });
    cleanups.push(() => {
      early.close();
      late.close();
    });
    const got = { early: [], late: [] };
    const recovered = { early: [], late: [] };
    const subs = {};
    for (const [name, c] of Object.entries({ early, late })) {
      subs[name] = c.subscribe("room-restart", {
        onPublication: (p) => got[name].push(p),
        onRecovered: (ok, info) => recovered[name].push({ ok, ...info }),
      });
    }
    await Promise.all([early.connect(), late.connect()]);
    await Promise.all([subs.early.ready, subs.late.ready]);
    assert.equal(subs.early.epoch, "", "nothing published yet: no epoch");
    for (let i = 1; i <= 3; i++) await early.publish("room-restart", { i });
    await waitFor(() => got.early.length === 3 && got.late.length === 3, { what: "the first three" });
    // The first publication started the epoch; both took it from the publications.
    const oldEpoch = subs.early.epoch;
    assert.notEqual(oldEpoch, "");
    assert.equal(subs.late.epoch, oldEpoch);

    // The server crashes and comes back on the same port, with nothing in memory.
    proxy.block(true);
    const downs = [nextEvent(early, "disconnected"), nextEvent(late, "disconnected")];
    await server.kill();
    await Promise.all(downs);
    server = await restartServer(port);

    // `early` is back first and talks in the new epoch (offsets start again at 1).
    await waitFor(() => recovered.early.length === 1, { what: "early resubscribed", timeout: 15000 });
    assert.equal(subs.early.epoch, "", "nothing published in the new server yet");
    for (let i = 4; i <= 5; i++) assert.equal((await early.publish("room-restart", { i })).offset, i - 3);
    await waitFor(() => got.early.length === 5, { what: "early sees its own" });
    const newEpoch = subs.early.epoch;
    assert.notEqual(newEpoch, "");
    assert.notEqual(newEpoch, oldEpoch, "a restart starts a new epoch");

    // `late` comes back after them: they are delivered to it from the new epoch's history.
    proxy.block(false);
    await waitFor(() => recovered.late.length === 1, { what: "late resubscribed", timeout: 15000 });

    // Live traffic continues for both.
    await late.publish("room-restart", { i: 6 });
    const lastIs6 = (list) => list.at(-1)?.data.i === 6;
    await waitFor(() => lastIs6(got.early) && lastIs6(got.late), { what: "the sixth" });
    // A marker behind everything: a late duplicate would arrive before it, so nothing can hide.
    await late.publish("room-restart", { i: "end" });
    const lastIsEnd = (list) => list.at(-1)?.data.i === "end";
    await waitFor(() => lastIsEnd(got.early) && lastIsEnd(got.late), { what: "the marker" });
    for (const name of ["early", "late"]) got[name].pop();
    for (const name of ["early", "late"]) {
      assert.deepEqual(got[name].map((p) => `${p.data.i}@${p.offset}`), ["1@1", "2@2", "3@3", "4@1", "5@2", "6@3"], `${name}: every one once, in order`);
    }
    for (const name of ["early", "late"]) {
      assert.deepEqual(got[name].map((p) => p.epoch), [oldEpoch, oldEpoch, oldEpoch, newEpoch, newEpoch, newEpoch], `${name}: epochs`);
    }

    // What the recovery reports: the stream restarted, so whatever may have followed offset 3
    // in the old epoch is unknown (`lost: null`); the new epoch's publications were delivered.
    assert.deepEqual(recovered.early, [{ ok: false, missed: 0, lost: null, epochChanged: true, offset: 0, epoch: "" }]);
    assert.deepEqual(recovered.late, [{ ok: false, missed: 2, lost: null, epochChanged: true, offset: 2, epoch: newEpoch }]);
    assert.deepEqual(subs.late.position, { offset: 4, epoch: newEpoch }, "after the marker");
  });

  test("subscribed before the first publication: the epoch comes with the publications, and a restart loses nothing", async () => {
    let server = await startServer();
    cleanups.push(() => server.stop());
    const port = server.port;
    const c = new RustySocks(server.wsUrl, { WebSocket, minDelay: 20, maxDelay: 200, timeout: 5000 });
    const writer = new RustySocks(server.wsUrl, { WebSocket, minDelay: 20, maxDelay: 200, timeout: 5000 });
    cleanups.push(() => {
      c.close();
      writer.close();
    });
    const got = [];
    const recovered = [];
    const gaps = [];
    const sub = c.subscribe("room-fresh", {
      onPublication: (p) => got.push(`${p.data.i}@${p.offset}/${p.epoch}`),
      onRecovered: (ok, info) => recovered.push({ ok, ...info }),
      onGap: (info) => gaps.push(info),
    });
    await c.connect();
    await writer.connect();
    const ready = await sub.ready;
    assert.deepEqual({ offset: ready.offset, epoch: ready.epoch }, { offset: 0, epoch: "" }, "nothing was ever published");
    for (let i = 1; i <= 3; i++) await writer.publish("room-fresh", { i });
    await waitFor(() => got.length === 3, { what: "the first three" });
    const epoch = sub.epoch;
    assert.notEqual(epoch, "", "the epoch came with the first publication");
    assert.deepEqual(sub.position, { offset: 3, epoch });

    // The server crashes and comes back empty: a new epoch, offsets from 1 again.
    const down = nextEvent(c, "disconnected");
    await server.kill();
    await down;
    server = await restartServer(port);
    await waitFor(() => recovered.length === 1, { what: "resubscribed", timeout: 15000 });
    assert.equal(recovered[0].ok, false, "the old epoch cannot be recovered");
    assert.equal(recovered[0].epochChanged, true);
    assert.deepEqual(sub.position, { offset: 0, epoch: "" }, "nothing published in the new server yet");
    await writer.connect();
    for (let i = 4; i <= 6; i++) await writer.publish("room-fresh", { i });
    await waitFor(() => got.length === 6, { what: "the new epoch's three (none taken as already delivered)" });
    const newEpoch = sub.epoch;
    assert.notEqual(newEpoch, "");
    assert.notEqual(newEpoch, epoch);
    assert.deepEqual(got, [`1@1/${epoch}`, `2@2/${epoch}`, `3@3/${epoch}`, `4@1/${newEpoch}`, `5@2/${newEpoch}`, `6@3/${newEpoch}`]);
    assert.deepEqual(gaps, []);
  });

  test("a position saved before the restart (page reload) resumes in the new epoch", async () => {
    let server = await startServer();
    cleanups.push(() => server.stop());
    const before = new RustySocks(server.wsUrl, { WebSocket, timeout: 5000 });
    await before.connect();
    for (let i = 1; i <= 4; i++) await before.publish("room-saved", { i });
    const saved = await before.history("room-saved", { limit: 1 });
    before.close();
    await server.stop();
    server = await restartServer(server.port);

    const writer = new RustySocks(server.wsUrl, { WebSocket, timeout: 5000 });
    const reader = new RustySocks(server.wsUrl, { WebSocket, timeout: 5000 });
    cleanups.push(() => {
      writer.close();
      reader.close();
    });
    await writer.connect();
    await writer.publish("room-saved", { i: "new 1" });
    await reader.connect();
    const got = [];
    const recovered = [];
    const sub = reader.subscribe("room-saved", {
      since: { offset: saved.offset, epoch: saved.epoch },
      onPublication: (p) => got.push([p.offset, p.data.i]),
      onRecovered: (ok, info) => recovered.push([ok, info.missed, info.epochChanged]),
    });
    await sub.ready;
    await waitFor(() => recovered.length === 1, { what: "the recovery report" });
    await writer.publish("room-saved", { i: "new 2" });
    await waitFor(() => got.length >= 2, { what: "the live one" });
    // A marker behind everything: a late duplicate would arrive before it.
    await writer.publish("room-saved", { i: "end" });
    await waitFor(() => got.at(-1)?.[1] === "end", { what: "the marker" });
    got.pop();
    assert.deepEqual(got, [[1, "new 1"], [2, "new 2"]]);
    assert.deepEqual(recovered, [[false, 1, true]]);
  });
});
