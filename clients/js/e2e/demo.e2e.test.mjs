// End-to-end: the demo page in headless Chromium against the real server.
//
// Each page is served through its own small HTTP + WebSocket proxy in front of the server: the
// proxy serves `/` and `/rusty-socks.js` from the files (or, with RUSTY_SOCKS_DEMO_FROM_SERVER=1,
// fetches them from the server), forwards everything else, including the `/ws` upgrade, and
// lets the test cut that page's connection.
//
// Run: node --test e2e/demo.e2e.mjs   (npm run test:e2e)
import assert from "node:assert/strict";
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { startServer } from "../test/helpers.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..");
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const FROM_SERVER = process.env.RUSTY_SOCKS_DEMO_FROM_SERVER === "1";
const ARTIFACTS = path.join(here, "artifacts");
const CHANNEL = "e2e-room";

const STATIC = {
  "/": { file: path.join(root, "demo/index.html"), type: "text/html; charset=utf-8" },
  "/index.html": { file: path.join(root, "demo/index.html"), type: "text/html; charset=utf-8" },
  "/rusty-socks.js": { file: path.join(root, "src/rusty-socks.js"), type: "text/javascript; charset=utf-8" },
};

/** An HTTP + WebSocket proxy in front of the server on `serverPort`. */
async function startDemoProxy(serverPort) {
  const sockets = new Set();
  let blocked = false;
  const forward = (req, res) => {
    const upstream = http.request(
      { host: "127.0.0.1", port: serverPort, method: req.method, path: req.url, headers: req.headers },
      (up) => {
        res.writeHead(up.statusCode ?? 502, up.headers);
        up.pipe(res);
      },
    );
    upstream.on("error", () => {
      res.writeHead(502);
      res.end("bad gateway");
    });
    req.pipe(upstream);
  };
  const server = http.createServer((req, res) => {
    const pathname = new URL(req.url ?? "/", "http://x").pathname;
    const asset = STATIC[pathname];
    if (asset && !FROM_SERVER && req.method === "GET") {
      res.writeHead(200, { "Content-Type": asset.type, "Cache-Control": "no-store" });
      res.end(readFileSync(asset.file));
      return;
    }
    forward(req, res);
  });
  server.on("upgrade", (req, socket, head) => {
    if (blocked) {
      socket.destroy();
      return;
    }
    const upstream = net.connect(serverPort, "127.0.0.1", () => {
      let raw = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let i = 0; i < req.rawHeaders.length; i += 2) raw += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      upstream.write(raw + "\r\n");
      if (head.length) upstream.write(head);
      upstream.pipe(socket);
      socket.pipe(upstream);
    });
    sockets.add(socket);
    sockets.add(upstream);
    const cleanup = () => {
      socket.destroy();
      upstream.destroy();
      sockets.delete(socket);
      sockets.delete(upstream);
    };
    for (const s of [socket, upstream]) {
      s.on("error", cleanup);
      s.on("close", cleanup);
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    get open() {
      return sockets.size / 2;
    },
    /** Cuts every WebSocket connection through this proxy (a network failure). */
    drop() {
      for (const s of [...sockets]) s.destroy();
    },
    block(value = true) {
      blocked = value;
    },
    close() {
      blocked = true;
      for (const s of [...sockets]) s.destroy();
      server.closeAllConnections?.();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

const skip = existsSync(CHROMIUM) ? false : `no Chromium at ${CHROMIUM} (apt-get install -y chromium, or set CHROMIUM_PATH)`;
const cleanups = [];
let server;
let browser;

before(async () => {
  if (skip) return;
  server = await startServer();
  cleanups.push(() => server.stop());
  if (FROM_SERVER) {
    // The server must serve the page and the module itself.
    for (const [route, type] of [["/", /text\/html/], ["/rusty-socks.js", /javascript/]]) {
      const res = await fetch(`${server.httpUrl}${route}`);
      assert.equal(res.status, 200, `RUSTY_SOCKS_DEMO_FROM_SERVER=1 but the server answers ${res.status} for ${route}`);
      assert.match(res.headers.get("content-type") ?? "", type, `Content-Type of ${route}`);
    }
  }
  const { chromium } = await import("playwright-core");
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: 30000,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  cleanups.push(() => browser.close());
}, { timeout: 30000 });

after(async () => {
  for (const fn of cleanups.reverse()) {
    try {
      await fn();
    } catch (err) {
      console.error("cleanup:", err);
    }
  }
});

async function openPage(proxy, name) {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  const page = await context.newPage();
  page.setDefaultTimeout(15000);
  const logs = [];
  page.on("console", (m) => logs.push(`[${name} ${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => logs.push(`[${name} pageerror] ${e.message}`));
  page.logs = logs;
  await page.goto(`${proxy.url}/?name=${name}`);
  await page.getByTestId("status").filter({ hasText: /^connected$/ }).waitFor();
  await page.getByTestId("channel-input").fill(CHANNEL);
  await page.getByTestId("join-button").click();
  await page.getByTestId("message-input").and(page.locator(":enabled")).waitFor();
  return { page, context };
}

async function send(page, text) {
  await page.getByTestId("message-input").fill(text);
  await page.getByTestId("send-button").click();
}

/** The texts of the messages shown, without the `#offset` and sender decorations. */
const messageTexts = (page) =>
  page.getByTestId("messages").locator("li:not(.system)").evaluateAll((items) =>
    items.map((li) => li.lastChild.textContent),
  );

/** Polls `fn` until it returns a value deepEqual to `expected`. */
async function eventually(fn, expected, { timeout = 15000, what = "" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = await fn();
    try {
      assert.deepEqual(last, expected);
      return;
    } catch (err) {
      if (Date.now() > deadline) {
        err.message = `${what}: ${err.message}`;
        throw err;
      }
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

test("two pages chat, see each other, and recover from a dropped connection", { skip, timeout: 30000 }, async (t) => {
  const proxyA = await startDemoProxy(server.port);
  const proxyB = await startDemoProxy(server.port);
  cleanups.push(() => proxyA.close(), () => proxyB.close());
  const a = await openPage(proxyA, "alice");
  const b = await openPage(proxyB, "bob");
  try {
    // Both are present.
    const presenceCount = (page) => page.getByTestId("presence").locator("li").count();
    await eventually(() => presenceCount(a.page), 2, { what: "alice sees two present" });
    await eventually(() => presenceCount(b.page), 2, { what: "bob sees two present" });

    // They exchange messages.
    await send(a.page, "hello from alice");
    await eventually(() => messageTexts(b.page), ["hello from alice"], { what: "bob receives" });
    await send(b.page, "hi alice");
    await eventually(() => messageTexts(a.page), ["hello from alice", "hi alice"], { what: "alice receives" });

    // Bob's network drops and stays down for a moment; alice keeps talking.
    proxyB.block(true);
    proxyB.drop();
    await b.page.getByTestId("status").filter({ hasNotText: /^connected$/ }).waitFor();
    await eventually(() => presenceCount(a.page), 1, { what: "alice sees bob gone after the drop" });
    for (const text of ["missed one", "missed two", "missed three"]) await send(a.page, text);
    await eventually(() => messageTexts(a.page), ["hello from alice", "hi alice", "missed one", "missed two", "missed three"], { what: "alice's own" });
    proxyB.block(false);

    // Bob reconnects by itself and shows what he missed, once each, in order.
    await b.page.getByTestId("status").filter({ hasText: /^connected$/ }).waitFor({ timeout: 15000 });
    const all = ["hello from alice", "hi alice", "missed one", "missed two", "missed three"];
    await eventually(() => messageTexts(b.page), all, { what: "bob recovered the missed messages" });
    await b.page.getByTestId("notice").filter({ hasText: "recovered 3 missed messages" }).waitFor();
    await eventually(() => presenceCount(a.page), 2, { what: "alice sees bob back" });

    // Live traffic goes on after the recovery.
    await send(b.page, "back again");
    await eventually(() => messageTexts(a.page), [...all, "back again"], { what: "alice gets bob's new message" });
    await eventually(() => messageTexts(b.page), [...all, "back again"], { what: "bob sees his own" });

    mkdirSync(ARTIFACTS, { recursive: true });
    await b.page.screenshot({ path: path.join(ARTIFACTS, "demo.png"), fullPage: true });

    // Bob leaves: alice's presence list shrinks (polled every 2 s).
    await b.context.close();
    await eventually(() => presenceCount(a.page), 1, { what: "alice sees bob leave" });
    const [mine] = await a.page.getByTestId("presence").locator("li").allTextContents();
    assert.match(mine, /\(you\)/);
  } catch (err) {
    t.diagnostic([...a.page.logs, ...b.page.logs].join("\n"));
    mkdirSync(ARTIFACTS, { recursive: true });
    await a.page.screenshot({ path: path.join(ARTIFACTS, "failure-alice.png") }).catch(() => {});
    await b.page.screenshot({ path: path.join(ARTIFACTS, "failure-bob.png") }).catch(() => {});
    throw err;
  } finally {
    await a.context.close().catch(() => {});
    await b.context.close().catch(() => {});
  }
});
