// Tokens (subprotocol, fresh token per connection, refresh) and close 4501 against the real
// server with a JWT secret and the server API enabled.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { RustySocks } from "../src/rusty-socks.js";
import { nextEvent, signHs256, sleep, startServer, startTcpProxy, waitFor } from "./helpers.js";

const SECRET = "test-secret-0123456789abcdef";
const API_KEY = "test-api-key-0123456789";

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;
const cleanups = [];
before(async () => {
  server = await startServer({
    RUSTY_SOCKS_JWT_SECRET: SECRET,
    RUSTY_SOCKS_API_KEY: API_KEY,
    RUSTY_SOCKS_REFRESH_WINDOW: "30",
  });
});
after(async () => {
  for (const fn of cleanups.reverse()) await fn();
  await server?.stop();
});

const token = (sub, ttl = 3600) => signHs256({ sub, exp: Math.floor(Date.now() / 1000) + ttl }, SECRET);

/** A WebSocket constructor that counts and records its connections. */
function countingWebSocket() {
  const made = [];
  class Counting extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      made.push({ url, protocols, socket: this });
    }
  }
  return { Counting, made };
}

describe("authentication", { timeout: 30000 }, () => {
  test("the token travels as a subprotocol; presence shows the user", async () => {
    const { Counting, made } = countingWebSocket();
    const c = new RustySocks(server.wsUrl, { WebSocket: Counting, token: token("u-sub") });
    cleanups.push(() => c.close());
    await c.connect();
    assert.equal(made.length, 1);
    assert.equal(made[0].protocols[0], "rusty-socks.v1");
    assert.match(made[0].protocols[1], /^token\.[\w-]+\.[\w-]+\.[\w-]+$/);
    assert.equal(made[0].socket.protocol, "rusty-socks.v1");
    assert.ok(!made[0].url.includes("token"), "not in the URL");
    await c.subscribe("room-auth").ready;
    const list = await c.presence("room-auth");
    assert.deepEqual(list.map((x) => x.user), ["u-sub"]);
  });

  test("a token function is called again for every connection and on a refresh push", async () => {
    const proxy = await startTcpProxy(server.port);
    cleanups.push(() => proxy.close());
    let calls = 0;
    // Expires within the refresh window: the server asks for a new one within a second or so.
    const c = new RustySocks(proxy.wsUrl, {
      WebSocket,
      minDelay: 20,
      maxDelay: 100,
      token: async () => {
        calls++;
        return token("u-refresh", calls === 1 ? 20 : 3600);
      },
    });
    cleanups.push(() => c.close());
    const refreshed = nextEvent(c, "refreshed", { timeout: 8000 });
    await c.connect();
    assert.equal(calls, 1);
    const { expiresAt } = await refreshed;
    assert.equal(calls, 2);
    assert.ok(expiresAt > Date.now() / 1000 + 3000, "the refreshed token's exp");
    proxy.drop();
    await nextEvent(c, "connected");
    assert.equal(calls, 3);
  });

  test("close 4501 (POST /api/disconnect) is final: no reconnect", async () => {
    const { Counting, made } = countingWebSocket();
    let calls = 0;
    const c = new RustySocks(server.wsUrl, {
      WebSocket: Counting,
      minDelay: 10,
      maxDelay: 50,
      token: () => {
        calls++;
        return token("u1");
      },
    });
    cleanups.push(() => c.close());
    await c.connect();
    await c.subscribe("room-kick").ready;
    const disconnected = nextEvent(c, "disconnected");
    const res = await fetch(`${server.httpUrl}/api/disconnect`, {
      method: "POST",
      headers: { Authorization: `apikey ${API_KEY}`, "Content-Type": "application/json" },
      body: JSON.stringify({ user: "u1" }),
    });
    assert.equal(res.status, 200);
    assert.deepEqual(await res.json(), { user: "u1", disconnected_here: 1 });
    const event = await disconnected;
    assert.equal(event.code, 4501);
    assert.equal(event.reconnect, false);
    assert.equal(c.state, "disconnected");
    await sleep(500); // many backoff periods
    assert.equal(made.length, 1, "no new connection attempt");
    assert.equal(calls, 1);
    assert.equal(c.state, "disconnected");
    await assert.rejects(c.publish("room-kick", 1), { code: "closed" });
    // The application may decide to come back.
    await c.connect();
    assert.equal(made.length, 2);
  });

  test("without a token the upgrade is refused and the client keeps retrying", async () => {
    const { Counting, made } = countingWebSocket();
    const c = new RustySocks(server.wsUrl, { WebSocket: Counting, minDelay: 10, maxDelay: 40 });
    cleanups.push(() => c.close());
    c.connect();
    await waitFor(() => made.length >= 3, { what: "retries" });
    assert.equal(c.state, "connecting");
    c.close();
  });
});
