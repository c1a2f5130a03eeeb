// Test helpers: the real server as a child process, a TCP proxy that can cut connections, an
// HS256 signer, a scripted fake WebSocket, and small waiting utilities. Loopback only.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
/** clients/js */
export const packageDir = path.resolve(here, "..");

/** The server binary: `RUSTY_SOCKS_TEST_BIN`, or `../../target/debug/rusty_socks` from clients/js. */
export function serverBinary() {
  const bin = process.env.RUSTY_SOCKS_TEST_BIN
    ? path.resolve(packageDir, process.env.RUSTY_SOCKS_TEST_BIN)
    : path.resolve(packageDir, "../../target/debug/rusty_socks");
  if (!existsSync(bin)) {
    throw new Error(
      `server binary not found at ${bin}: build it with \`cargo build --bin rusty_socks\` ` +
        "in the repository root, or set RUSTY_SOCKS_TEST_BIN",
    );
  }
  return bin;
}

const children = new Set();
process.on("exit", () => {
  for (const child of children) {
    try {
      process.kill(child.pid, "SIGKILL");
    } catch {
      // already gone
    }
  }
});

/**
 * Starts the server on 127.0.0.1 with a free port and waits for its `listening on` line.
 * @param {Record<string, string>} [env] extra environment
 * @returns {Promise<{port: number, wsUrl: string, httpUrl: string, pid: number, output: () => string, stop: () => Promise<void>, kill: () => Promise<void>}>}
 */
export function startServer(env = {}) {
  const bin = serverBinary();
  const child = spawn(bin, [], {
    env: {
      ...process.env,
      RUSTY_SOCKS_HOST: "127.0.0.1",
      RUSTY_SOCKS_PORT: "0",
      RUST_LOG: "info",
      NO_COLOR: "1",
      ...env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  children.add(child);
  let out = "";
  const exited = new Promise((resolve) => child.once("exit", resolve));
  exited.then(() => children.delete(child));
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    process.kill(/** @type {number} */ (child.pid), "SIGTERM");
    const timer = setTimeout(() => {
      try {
        process.kill(/** @type {number} */ (child.pid), "SIGKILL");
      } catch {
        // gone
      }
    }, 6000);
    await exited;
    clearTimeout(timer);
  };
  /** A crash: SIGKILL, no goodbye to the clients; resolves once the process is gone. */
  const kill = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    process.kill(/** @type {number} */ (child.pid), "SIGKILL");
    await exited;
  };
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      stop();
      reject(new Error(`server did not report its address within 15 s; output:\n${out}`));
    }, 15000);
    const onData = (/** @type {Buffer} */ chunk) => {
      out += chunk.toString();
      if (out.length > 200000) out = out.slice(-100000);
      // eslint-disable-next-line no-control-regex
      const m = out.replace(/\x1b\[[0-9;]*m/g, "").match(/listening on 127\.0\.0\.1:(\d+)/);
      if (m) {
        clearTimeout(timer);
        child.stdout.off("data", onData);
        child.stdout.on("data", (c) => {
          out += c.toString();
          if (out.length > 200000) out = out.slice(-100000);
        });
        const port = Number(m[1]);
        resolve({
          port,
          pid: /** @type {number} */ (child.pid),
          wsUrl: `ws://127.0.0.1:${port}/ws`,
          httpUrl: `http://127.0.0.1:${port}`,
          output: () => out,
          stop,
          kill,
        });
      }
    };
    child.stdout.on("data", onData);
    child.stderr.on("data", (c) => {
      out += c.toString();
    });
    child.once("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`server exited early (${code ?? signal}); output:\n${out}`));
    });
  });
}

/**
 * Starts the server again on `port` (after a stop or a kill: a restart, with a fresh in-memory
 * state and so new epochs), retrying while the port is not free yet.
 * @param {number} port
 * @param {Record<string, string>} [env]
 * @returns {ReturnType<typeof startServer>}
 */
export async function restartServer(port, env = {}) {
  const deadline = Date.now() + 20000;
  for (;;) {
    try {
      return await startServer({ ...env, RUSTY_SOCKS_PORT: String(port) });
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await sleep(200);
    }
  }
}

/**
 * A TCP proxy in front of `targetPort`: `drop()` destroys every proxied connection (a network
 * failure for both ends), `block(true)` refuses new ones until `block(false)`.
 * `pauseUpstream()` stops reading from the server (so its output queues up), `resumeUpstream()` undoes it.
 */
export async function startTcpProxy(targetPort) {
  /** @type {Set<net.Socket>} */
  const sockets = new Set();
  /** @type {Map<net.Socket, net.Socket>} upstream -> client */
  const upstreams = new Map();
  let blocked = false;
  let connections = 0;
  const server = net.createServer((client) => {
    if (blocked) {
      client.destroy();
      return;
    }
    connections++;
    const upstream = net.connect(targetPort, "127.0.0.1");
    sockets.add(client);
    sockets.add(upstream);
    upstreams.set(upstream, client);
    client.pipe(upstream);
    upstream.pipe(client);
    const cleanup = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
      upstreams.delete(upstream);
    };
    client.on("error", cleanup);
    upstream.on("error", cleanup);
    client.on("close", cleanup);
    upstream.on("close", cleanup);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(undefined)));
  const port = /** @type {net.AddressInfo} */ (server.address()).port;
  return {
    port,
    wsUrl: `ws://127.0.0.1:${port}/ws`,
    get connections() {
      return connections;
    },
    get open() {
      return upstreams.size;
    },
    drop() {
      for (const s of [...sockets]) s.destroy();
    },
    block(value = true) {
      blocked = value;
    },
    pauseUpstream() {
      for (const u of upstreams.keys()) {
        u.unpipe();
        u.pause();
      }
    },
    resumeUpstream() {
      for (const [u, client] of upstreams) {
        u.pipe(client);
        u.resume();
      }
    },
    close() {
      blocked = true;
      for (const s of [...sockets]) s.destroy();
      return new Promise((resolve) => server.close(() => resolve(undefined)));
    },
  };
}

const b64url = (/** @type {Buffer | string} */ data) => Buffer.from(data).toString("base64url");

/** Signs an HS256 JWT. */
export function signHs256(payload, secret) {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(payload));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** Polls `predicate` until it is truthy (returns its value) or `ms` pass (throws). */
export async function waitFor(predicate, { timeout = 10000, interval = 10, what = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(interval);
  }
}

export const sleep = (/** @type {number} */ ms) => new Promise((r) => setTimeout(r, ms));

/** Resolves with the next emission of `event` on a client (rejects after `timeout`). */
export function nextEvent(client, event, { timeout = 10000, filter = (_arg) => true } = {}) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out waiting for event ${event}`));
    }, timeout);
    const off = client.on(event, (arg) => {
      if (!filter(arg)) return;
      clearTimeout(timer);
      off();
      resolve(arg);
    });
  });
}

/**
 * A scripted WebSocket for unit tests: the test plays the server.
 * `FakeWebSocket.instances` lists every socket created, newest last.
 */
export class FakeWebSocket {
  /** @type {FakeWebSocket[]} */
  static instances = [];
  static reset() {
    FakeWebSocket.instances = [];
  }
  static get last() {
    return FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
  }

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    /** @type {any[]} frames the client sent, parsed */
    this.sent = [];
    this.closedWith = null;
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    FakeWebSocket.instances.push(this);
  }
  send(data) {
    if (this.readyState !== 1) throw new Error("not open");
    this.sent.push(JSON.parse(data));
  }
  close(code, reason) {
    this.closedWith = { code, reason };
    if (this.readyState === 3) return;
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code: code ?? 1005, reason: reason ?? "" }), 0);
  }
  // ---- the test's side
  /** Opens and sends the v1 `welcome`, as a server does for a connection offering rusty-socks.v1. */
  accept(clientId = "00000000-0000-4000-8000-000000000001") {
    this.readyState = 1;
    this.onopen?.({});
    this.push({ type: "welcome", client_id: clientId, version: "0.1.0", user: null });
  }
  /** Opens like a server from before the v1 welcome: `Connect` and a legacy replay frame. */
  acceptLegacy(clientId = "00000000-0000-4000-8000-000000000001") {
    this.readyState = 1;
    this.onopen?.({});
    this.push({ type: "Connect", client_id: clientId });
    this.push({ type: "Chat", id: "x", sender: "legacy", content: "old", timestamp: "2025-03-15T12:00:00Z" });
  }
  push(frame) {
    this.onmessage?.({ data: typeof frame === "string" ? frame : JSON.stringify(frame) });
  }
  serverClose(code = 1006, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  /** The last frame sent with this `type` (and channel, if given). */
  lastSent(type, channel) {
    for (let i = this.sent.length - 1; i >= 0; i--) {
      const f = this.sent[i];
      if (f.type === type && (channel === undefined || f.channel === channel)) return f;
    }
    return undefined;
  }
}
