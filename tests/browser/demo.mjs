// Two pages of the chat demo in the same room, in headless Chromium: each sees
// the other's messages, and the online count drops when one leaves.
// Usage: node demo.mjs http://127.0.0.1:PORT
import { chromium } from "playwright-core";

const base = process.argv[2];
if (!base) throw new Error("usage: node demo.mjs <api base url>");
const room = "browser" + process.pid;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const step = async (what, promise) => {
  try { return await promise; } catch (err) { throw new Error(`${what}: ${err.message}`); }
};
try {
  const open = async (name) => {
    const page = await browser.newPage();
    page.on("pageerror", (err) => console.error(`[${name}] page error: ${err}`));
    await page.goto(`${base}/?room=${room}&name=${name}&hb=500`);
    await step(`${name} connects`, page.waitForFunction(
      () => document.getElementById("status").textContent.startsWith("connected to room"), null, { timeout: 15000 }));
    return page;
  };
  const alice = await open("alice");
  const bob = await open("bob");
  const online = (page, n) => page.waitForFunction(
    (n) => document.getElementById("online").textContent === String(n), n, { timeout: 15000 });
  await step("alice sees 2 online", online(alice, 2));
  await step("bob sees 2 online", online(bob, 2));

  const say = async (page, text) => {
    await page.fill("#text", text);
    await page.click("#send button");
  };
  const sees = (page, text) => page.waitForFunction(
    (text) => [...document.querySelectorAll("#log p")].some((p) => p.textContent === text), text, { timeout: 15000 });
  await say(alice, "hello from alice");
  await step("bob sees alice", sees(bob, "alice: hello from alice"));
  await step("alice sees herself", sees(alice, "alice: hello from alice"));
  await say(bob, "hi alice");
  await step("alice sees bob", sees(alice, "bob: hi alice"));

  await bob.click("#leave");
  await step("bob left", bob.waitForFunction(
    () => document.getElementById("status").textContent === "connected, in no room", null, { timeout: 15000 }));
  await step("alice sees 1 online", online(alice, 1));
  await alice.screenshot({ path: process.env.SCREENSHOT || "/tmp/rim-demo.png" });
  console.log("browser demo: ok");
} finally {
  await browser.close();
}
