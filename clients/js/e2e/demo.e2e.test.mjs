// End-to-end: the demo page in headless Chromium against the real server: two pages chatting
// through a dropped connection, errors shown in the page, and a server restart (new epoch).
//
// Each page is served through its own small HTTP + WebSocket proxy in front of the server: the
// proxy serves `/` and `/rusty-socks.js` from the files (or, with RUSTY_SOCKS_TEST_DEMO_FROM_SERVER=1,
// fetches them from the server), forwards everything else, including the `/ws` upgrade, and
// lets the test cut that page's connection.
//
// Run: node --test e2e/demo.e2e.test.mjs   (npm run test:e2e)
import assert from "node:assert/strict";
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { restartServer, startServer } from "../test/helpers.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..");
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const FROM_SERVER = process.env.RUSTY_SOCKS_TEST_DEMO_FROM_SERVER === "1";
const ARTIFACTS = path.join(here, "artifacts");
const CHANNEL = "E2E-Room"; // mixed case: channel names are case-sensitive

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
      assert.equal(res.status, 200, `RUSTY_SOCKS_TEST_DEMO_FROM_SERVER=1 but the server answers ${res.status} for ${route}`);
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

async function openPage(proxy, name, { channel = CHANNEL } = {}) {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  const page = await context.newPage();
  page.setDefaultTimeout(15000);
  const logs = [];
  page.on("console", (m) => logs.push(`[${name} ${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => logs.push(`[${name} pageerror] ${e.message}`));
  page.on("response", (r) => {
    if (r.status() >= 400) logs.push(`[${name} http ${r.status()}] ${r.url()}`);
  });
  page.logs = logs;
  await page.goto(name ? `${proxy.url}/?name=${name}` : proxy.url);
  await page.getByTestId("status").filter({ hasText: /^connected$/ }).waitFor();
  if (channel) {
    await page.getByTestId("channel-input").fill(channel);
    await page.getByTestId("join-button").click();
    await page.getByTestId("message-input").and(page.locator(":enabled")).waitFor();
  }
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

/** The names in the presence list, sorted. */
const presenceNames = (page) => page.getByTestId("presence").locator("li").allTextContents().then((names) => names.sort());

/** The sender shown on each message. */
const senders = (page) => page.getByTestId("messages").locator("li:not(.system) .from").allTextContents();

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

    // One display name per person, the same in the messages and in presence.
    await eventually(() => presenceNames(a.page), ["alice (you)", "bob"], { what: "alice's presence shows the names" });
    await eventually(() => presenceNames(b.page), ["alice", "bob (you)"], { what: "bob's presence shows the names" });
    assert.deepEqual(await senders(a.page), ["alice (you)", "bob"]);
    await eventually(() => senders(b.page), ["alice", "bob (you)"], { what: "bob's senders" });
    assert.equal(await a.page.getByTestId("name-input").inputValue(), "alice");
    // Every message has the time it was sent.
    const now = Date.now();
    for (const stamp of await a.page.getByTestId("messages").locator("li:not(.system)").evaluateAll((items) => items.map((li) => li.querySelector("time")?.dateTime ?? null))) {
      assert.ok(stamp && Math.abs(Date.parse(stamp) - now) < 10 * 60 * 1000, `a message timestamp: ${stamp}`);
    }
    assert.equal(await a.page.getByTestId("messages").locator("li:not(.system) time").count(), 2);
    assert.match(await a.page.getByTestId("messages").locator("time").first().innerText(), /\d{1,2}:\d{2}/);
    // The channel name keeps its case, as shown (CSS included).
    assert.equal(await a.page.getByTestId("channel-name").innerText(), `· ${CHANNEL}`);
    // A favicon, inline (no request to the server), that a browser can decode.
    const icon = await a.page.evaluate(async () => {
      const href = document.querySelector('link[rel="icon"]')?.href ?? "";
      const img = new Image();
      img.src = href;
      await img.decode();
      return { scheme: href.slice(0, 19), width: img.naturalWidth };
    });
    assert.equal(icon.scheme, "data:image/svg+xml,");
    assert.ok(icon.width > 0, "the favicon decodes");
    assert.deepEqual(a.page.logs.filter((line) => /404|favicon/i.test(line)), [], "no request for /favicon.ico");

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
    // Bob's new connection is still shown by his name.
    await eventually(() => presenceNames(a.page), ["alice (you)", "bob"], { what: "alice sees bob's name again" });

    // Bob picks another name: presence and his next messages show it.
    await b.page.getByTestId("name-input").fill("Robert");
    await b.page.getByTestId("name-input").press("Enter");
    await eventually(() => presenceNames(a.page), ["Robert", "alice (you)"], { what: "alice sees the new name" });
    await eventually(() => presenceNames(b.page), ["Robert (you)", "alice"], { what: "bob sees his new name" });

    // Live traffic goes on after the recovery.
    await send(b.page, "back again");
    await eventually(() => messageTexts(a.page), [...all, "back again"], { what: "alice gets bob's new message" });
    await eventually(() => messageTexts(b.page), [...all, "back again"], { what: "bob sees his own" });
    assert.equal((await senders(a.page)).at(-1), "Robert");
    assert.equal((await senders(b.page)).at(-1), "Robert (you)");
    assert.deepEqual(await messageTexts(b.page), [...all, "back again"], "the rename did not rejoin the channel");

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

test("a refused join disables the send box and says why; refused commands are shown", { skip, timeout: 60000 }, async (t) => {
  const proxy = await startDemoProxy(server.port);
  cleanups.push(() => proxy.close());
  // No name given: a default one; no channel typed: the default one, which works on a server
  // with no settings.
  const c = await openPage(proxy, "", { channel: "" });
  const { page } = c;
  const notice = page.getByTestId("notice");
  const sendBox = page.getByTestId("message-input");
  try {
    assert.match(await page.getByTestId("name-input").inputValue(), /^guest-\w+$/);
    assert.equal(await page.getByTestId("channel-input").inputValue(), "lobby");
    assert.equal(await sendBox.isDisabled(), true, "nothing to send to before joining");
    await page.getByTestId("join-button").click();
    await sendBox.and(page.locator(":enabled")).waitFor();
    await send(page, "hello lobby");
    await eventually(async () => (await messageTexts(page)).includes("hello lobby"), true, { what: "the lobby message" });

    // A channel the server refuses: the send box is disabled, and the reason is shown.
    await page.getByTestId("channel-input").fill("nope:Room");
    await page.getByTestId("join-button").click();
    await sendBox.and(page.locator(":disabled")).waitFor();
    await notice.filter({ hasText: "unknown_namespace" }).waitFor();
    assert.match(await notice.innerText(), /cannot join nope:Room: .*nope.*\(unknown_namespace\)/);
    assert.equal(await page.getByTestId("send-button").isDisabled(), true);
    assert.match(await page.getByTestId("messages").locator("li.system").innerText(), /could not join nope:Room/);
    assert.equal(await page.getByTestId("channel-name").innerText(), "· nope:Room");

    // A good one again.
    await page.getByTestId("channel-input").fill("E2E-Other");
    await page.getByTestId("join-button").click();
    await sendBox.and(page.locator(":enabled")).waitFor();

    // A publication the server refuses (too big): the page says so and keeps the text.
    const big = "x".repeat(40000);
    await page.getByTestId("message-input").fill(big);
    await page.getByTestId("send-button").click();
    await notice.filter({ hasText: "data_too_big" }).waitFor();
    assert.match(await notice.innerText(), /^not sent: /);
    assert.equal((await sendBox.inputValue()).length, big.length);

    // An error frame that answers no command of the page's: shown too.
    await page.evaluate(() => window.rustySocks._ws.send("{not json"));
    await notice.filter({ hasText: "invalid_json" }).waitFor();
    assert.match(await notice.innerText(), /^error: /);
  } catch (err) {
    t.diagnostic(page.logs.join("\n"));
    mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: path.join(ARTIFACTS, "failure-errors.png") }).catch(() => {});
    throw err;
  } finally {
    await c.context.close().catch(() => {});
  }
});

test("after a server restart, new messages reach both pages, the sender's too, once each", { skip, timeout: 120000 }, async (t) => {
  // A server of its own, restarted on the same port: a new process, nothing in memory, so the
  // channel's offsets start again at 1 under a new epoch.
  let own = await startServer();
  cleanups.push(() => own.stop());
  const proxyA = await startDemoProxy(own.port);
  const proxyB = await startDemoProxy(own.port);
  cleanups.push(() => proxyA.close(), () => proxyB.close());
  const channel = "Restart-Room";
  const a = await openPage(proxyA, "alice", { channel });
  const b = await openPage(proxyB, "bob", { channel });
  const connected = (page) => page.getByTestId("status").filter({ hasText: /^connected$/ });
  try {
    await send(a.page, "before one");
    await send(b.page, "before two");
    const before = ["before one", "before two"];
    await eventually(() => messageTexts(a.page), before, { what: "alice before the restart" });
    await eventually(() => messageTexts(b.page), before, { what: "bob before the restart" });

    // The server crashes; bob stays offline a little longer than alice.
    proxyB.block(true);
    await own.kill();
    await a.page.getByTestId("status").filter({ hasNotText: /^connected$/ }).waitFor();
    await b.page.getByTestId("status").filter({ hasNotText: /^connected$/ }).waitFor();
    own = await restartServer(own.port);

    // Alice is back first and talks in the new epoch: she sees her own message.
    await connected(a.page).waitFor({ timeout: 30000 });
    await send(a.page, "after one");
    await eventually(() => messageTexts(a.page), [...before, "after one"], { what: "alice sees her own message after the restart", timeout: 20000 });
    // Told plainly what is known: the history was lost with the restart, so whatever was sent
    // just before it and had not reached her (perhaps nothing) is gone.
    await a.page.getByTestId("notice").filter({ hasText: "the server restarted" }).waitFor();
    assert.match(await a.page.getByTestId("notice").innerText(), /^the server restarted: messages you had not received before the restart, if any, could not be recovered$/);

    // Bob comes back: he gets what alice said meanwhile.
    proxyB.block(false);
    await connected(b.page).waitFor({ timeout: 30000 });
    await eventually(() => messageTexts(b.page), [...before, "after one"], { what: "bob gets the message sent while he was away", timeout: 20000 });

    await send(b.page, "after two");
    await send(a.page, "after three");
    const all = [...before, "after one", "after two", "after three"];
    await eventually(() => messageTexts(a.page), all, { what: "alice: every message once, in order", timeout: 20000 });
    await eventually(() => messageTexts(b.page), all, { what: "bob: every message once, in order", timeout: 20000 });
    assert.match(await b.page.getByTestId("notice").innerText(), /^the server restarted: .* if any, could not be recovered; 1 message sent since then recovered$/);
    // The restart is marked where it happened, and names survive it.
    for (const page of [a.page, b.page]) {
      const items = await page.getByTestId("messages").locator("li").evaluateAll((lis) => lis.map((li) => (li.classList.contains("system") ? "--" : li.lastChild.textContent)));
      assert.deepEqual(items, [...before, "--", "after one", "after two", "after three"]);
    }
    await eventually(() => presenceNames(a.page), ["alice (you)", "bob"], { what: "alice's presence after the restart" });
    await eventually(() => senders(b.page), ["alice", "bob (you)", "alice", "bob (you)", "alice"], { what: "bob's senders" });
    mkdirSync(ARTIFACTS, { recursive: true });
    await b.page.screenshot({ path: path.join(ARTIFACTS, "restart.png"), fullPage: true });
  } catch (err) {
    t.diagnostic([...a.page.logs, ...b.page.logs].join("\n"));
    mkdirSync(ARTIFACTS, { recursive: true });
    await a.page.screenshot({ path: path.join(ARTIFACTS, "failure-restart-alice.png") }).catch(() => {});
    await b.page.screenshot({ path: path.join(ARTIFACTS, "failure-restart-bob.png") }).catch(() => {});
    throw err;
  } finally {
    await a.context.close().catch(() => {});
    await b.context.close().catch(() => {});
  }
});
