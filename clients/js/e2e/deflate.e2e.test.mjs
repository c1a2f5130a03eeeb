// End-to-end: the demo page, as the server serves it, in headless Chromium (which offers
// permessage-deflate by default) against a compressing server (RUSTY_SOCKS_COMPRESSION=true):
// the browser negotiates the extension, and two pages chat with messages long enough to be
// compressed both ways.
//
// Run: node --test e2e/deflate.e2e.test.mjs   (npm run test:e2e)
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { after, before, test } from "node:test";
import { startServer } from "../test/helpers.js";

const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const skip = existsSync(CHROMIUM) ? false : `no Chromium at ${CHROMIUM} (apt-get install -y chromium, or set CHROMIUM_PATH)`;
let server;
let browser;

before(async () => {
  if (skip) return;
  server = await startServer({ RUSTY_SOCKS_COMPRESSION: "true" });
  const { chromium } = await import("playwright-core");
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: 30000,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
  });
}, { timeout: 30000 });

after(async () => {
  await browser?.close();
  await server?.stop();
});

async function openPage(name) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(15000);
  await page.goto(`${server.httpUrl}/?name=${name}`);
  await page.getByTestId("status").filter({ hasText: /^connected$/ }).waitFor();
  await page.getByTestId("channel-input").fill("deflate-room");
  await page.getByTestId("join-button").click();
  await page.getByTestId("message-input").and(page.locator(":enabled")).waitFor();
  return page;
}

test("Chromium negotiates permessage-deflate and the demo page chats through it", { skip, timeout: 60000 }, async () => {
  const a = await openPage("alice");
  const b = await openPage("bob");
  // What the browser agreed on, seen from a page's own WebSocket.
  const extensions = await a.evaluate(
    (url) =>
      new Promise((resolve, reject) => {
        const ws = new WebSocket(url, "rusty-socks.v1");
        ws.onopen = () => {
          resolve(ws.extensions);
          ws.close();
        };
        ws.onerror = () => reject(new Error("WebSocket failed"));
      }),
    server.wsUrl,
  );
  assert.equal(extensions, "permessage-deflate; server_no_context_takeover; client_no_context_takeover");

  // Long enough (over RUSTY_SOCKS_COMPRESSION_MIN_SIZE) to travel compressed both ways.
  const long = `compressible ${"la ".repeat(200)}end`;
  await a.getByTestId("message-input").fill(long);
  await a.getByTestId("send-button").click();
  const texts = (page) =>
    page.getByTestId("messages").locator("li:not(.system)").evaluateAll((items) => items.map((li) => li.lastChild.textContent));
  const deadline = Date.now() + 15000;
  let got = [];
  while (Date.now() < deadline) {
    got = await texts(b);
    if (got.length > 0) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.deepEqual(got, [long]);
  await b.getByTestId("message-input").fill("short reply");
  await b.getByTestId("send-button").click();
  await a.getByTestId("messages").locator("li:not(.system)").nth(1).waitFor();
  assert.deepEqual(await texts(a), [long, "short reply"]);
});
