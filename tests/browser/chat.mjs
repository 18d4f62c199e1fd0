// The demo's chat view in headless Chromium: user A on two devices and user
// B on one, each in a browser context of its own. A and B talk; A's devices
// converge on the same list; B goes offline, misses messages and catches up
// in order without duplicates; unread counts follow reads on other devices;
// a message written while offline is sent once on reconnect; history loads
// page by page on scroll up; a group created over HTTP works the same way,
// and the newest conversation is listed first.
// Usage: node chat.mjs http://127.0.0.1:PORT
import { chromium } from "playwright-core";

const base = process.argv[2];
if (!base) throw new Error("usage: node chat.mjs <api base url>");
const A = 1, B = 2, P = "p:1:2";
const WAIT = 15000;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

// Runs one step; on failure says which, with what the page showed.
const step = async (what, page, fn) => {
  try { return await fn(); } catch (err) {
    const seen = page ? await page.evaluate(() => ({
      status: document.getElementById("chat-status").textContent,
      convs: [...document.querySelectorAll("#convs li")].map((li) => ({ ...li.dataset })),
      shown: [...document.querySelectorAll("#messages p")].map((p) => p.textContent).slice(-8),
      sync: window.chat.sync, stats: window.chat.stats,
    })).catch(() => "(page unavailable)") : "";
    throw new Error(`${what}: ${err.message}\n  the page: ${JSON.stringify(seen)}`);
  }
};
const until = (page, what, fn, arg) => step(what, page, () => page.waitForFunction(fn, arg, { timeout: WAIT }));

try {
  const device = async (name, mid, dev) => {
    const context = await browser.newContext();
    const page = await context.newPage();
    page.on("pageerror", (err) => console.error(`[${name}] page error: ${err}`));
    page.name = name;
    await page.goto(`${base}/?mid=${mid}&device=${dev}&hb=500&page=20`);
    await online(page);
    return page;
  };
  const online = (page) => until(page, `${page.name} is online`,
    () => document.getElementById("chat-status").dataset.state === "online");
  const a1 = await device("A on device 1", A, "one");
  const a2 = await device("A on device 2", A, "two");
  const b = await device("B", B, "phone");

  // (seq, from, body) of the messages shown, in order.
  const shown = (page) => page.evaluate(() => [...document.querySelectorAll("#messages p[data-seq]")]
    .map((p) => [Number(p.dataset.seq), Number(p.dataset.from), p.textContent.replace(/^[^:]*: /, "")]));
  const entry = (page, conv) => page.evaluate((conv) => {
    const li = document.querySelector(`#convs li[data-conv="${conv}"]`);
    return li ? { unread: Number(li.dataset.unread), max: Number(li.dataset.max) } : null;
  }, conv);
  const listed = (page, conv, max, unread) => until(page,
    `${page.name} lists ${conv} with max seq ${max} and ${unread} unread`,
    ([conv, max, unread]) => {
      const li = document.querySelector(`#convs li[data-conv="${conv}"]`);
      return li && li.dataset.max === String(max) && li.dataset.unread === String(unread);
    }, [conv, max, unread]);
  // Waits until the open conversation shows exactly seqs first..last, each once, in order.
  const showsRun = (page, first, last) => until(page, `${page.name} shows seqs ${first}..${last}`,
    ([first, last]) => {
      const seqs = [...document.querySelectorAll("#messages p[data-seq]")].map((p) => Number(p.dataset.seq));
      return seqs.length === last - first + 1 && seqs.every((s, i) => s === first + i);
    }, [first, last]);
  const sent = (page) => until(page, `${page.name} has no unacknowledged send`, () => window.chat.pending.size === 0);
  const write = async (page, text) => {
    await page.fill("#chat-text", text);
    await page.click("#compose button");
  };
  const openConv = (page, conv) => page.click(`#convs li[data-conv="${conv}"]`);

  // A starts a chat with B from device 1.
  await a1.fill("#peer", String(B));
  await a1.click("#start button");
  await write(a1, "hello B");
  await showsRun(a1, 1, 1);
  await listed(b, P, 1, 1);
  await listed(a2, P, 1, 0); // A's own message, pushed to A's other device, is read

  // B reads it and answers; A reads on device 1, so device 2's unread count drops too.
  await openConv(b, P);
  await showsRun(b, 1, 1);
  await listed(b, P, 1, 0);
  await write(b, "hi A");
  await showsRun(a1, 1, 2);
  await listed(a2, P, 2, 0);

  // Device 2 writes; everyone sees it in the same place.
  await openConv(a2, P);
  await write(a2, "from A's second device");
  for (const page of [a1, a2, b]) await showsRun(page, 1, 3);
  const base3 = await shown(a1);
  for (const page of [a2, b]) {
    const other = await shown(page);
    if (JSON.stringify(other) !== JSON.stringify(base3))
      throw new Error(`${page.name} shows ${JSON.stringify(other)}, A on device 1 ${JSON.stringify(base3)}`);
  }
  const expect3 = [[1, A, "hello B"], [2, B, "hi A"], [3, A, "from A's second device"]];
  if (JSON.stringify(base3) !== JSON.stringify(expect3))
    throw new Error(`the conversation is ${JSON.stringify(base3)}, expected ${JSON.stringify(expect3)}`);

  // B goes offline with the conversation closed; A writes five messages.
  await b.click("#close");
  await b.context().setOffline(true);
  await until(b, "B notices it is offline", () => document.getElementById("chat-status").dataset.state === "offline");
  const syncedBefore = await b.evaluate(() => window.chat.stats.synced);
  for (let i = 1; i <= 5; i++) await write(a1, `while B is away ${i}`);
  await showsRun(a1, 1, 8);
  await sent(a1);
  await b.context().setOffline(false);
  await online(b);
  await listed(b, P, 8, 5);
  const synced = await b.evaluate(() => window.chat.stats.synced) - syncedBefore;
  if (synced < 5) throw new Error(`B got ${synced} messages by SYNC after coming back, expected at least 5`);
  await openConv(b, P);
  await showsRun(b, 1, 8);
  await listed(b, P, 8, 0);
  const caught = await shown(b);
  for (let i = 1; i <= 5; i++) {
    const [seq, from, body] = caught[2 + i];
    if (seq !== 3 + i || from !== A || body !== `while B is away ${i}`)
      throw new Error(`B caught up with ${JSON.stringify(caught.slice(3))}`);
  }
  await showsRun(a2, 1, 8);

  // A message written while offline is pending, then sent once on reconnect.
  await a1.context().setOffline(true);
  await until(a1, "A on device 1 notices it is offline", () => document.getElementById("chat-status").dataset.state === "offline");
  await write(a1, "written offline");
  await until(a1, "the offline message is pending", () => document.querySelectorAll("#messages p.pending").length === 1);
  await a1.context().setOffline(false);
  await online(a1);
  await sent(a1);
  for (const page of [a1, a2, b]) await showsRun(page, 1, 9);
  const ninth = (await shown(b))[8];
  if (ninth[2] !== "written offline") throw new Error(`seq 9 is ${JSON.stringify(ninth)}`);

  // History: 60 more messages, then B reopens the page: the view starts with
  // the newest page of 20 and loads older pages as it is scrolled up.
  await a2.evaluate(async () => { for (let i = 1; i <= 60; i++) await window.say(`bulk ${i}`); });
  for (const page of [a1, a2, b]) await showsRun(page, 1, 69);
  const a1All = JSON.stringify(await shown(a1));
  if (a1All !== JSON.stringify(await shown(a2))) throw new Error("A's devices show different lists after 60 messages");
  if (a1All !== JSON.stringify(await shown(b))) throw new Error("A and B show different lists after 60 messages");
  await until(b, "B has acknowledged its inbox", () => window.chat.acked === window.chat.sync && window.chat.sync > 0);
  await b.reload();
  await online(b);
  await listed(b, P, 69, 0);
  await openConv(b, P);
  await showsRun(b, 50, 69);
  for (const first of [30, 10, 1]) {
    await b.evaluate(() => { document.getElementById("messages").scrollTop = 0; });
    await showsRun(b, first, 69);
  }
  if (a1All !== JSON.stringify(await shown(b))) throw new Error("B's history differs from what A sees");
  await until(b, "B says the history is complete",
    () => document.querySelector("#messages p.sys").textContent === "start of the conversation");

  // A group, created by the business over HTTP; A writes from device 1.
  const http = async (method, path, body) => {
    const res = await fetch(base + path, { method, body: JSON.stringify(body) });
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${await res.text()}`);
  };
  await http("PUT", "/im/v1/groups/team", { name: "Team", max_members: 10 });
  await http("POST", "/im/v1/groups/team/members", { add: [A, B] });
  const G = "g:team";
  await a1.fill("#peer", G);
  await a1.click("#start button");
  await write(a1, "hello team");
  await showsRun(a1, 1, 1);
  await listed(b, G, 1, 1);
  await listed(a2, G, 1, 0);
  for (const page of [a1, a2, b]) {
    await until(page, `${page.name} lists the group first (the newest conversation)`,
      (G) => document.querySelector("#convs li")?.dataset.conv === G, G);
  }
  // B answers in the group; A read it on device 1, so device 2 counts nothing unread.
  await openConv(b, G);
  await write(b, "hi team");
  await showsRun(a1, 1, 2);
  await listed(a2, G, 2, 0);
  await listed(a2, P, 69, 0);
  await openConv(a2, G);
  for (const page of [a2, b]) await showsRun(page, 1, 2);
  const expectGroup = JSON.stringify([[1, A, "hello team"], [2, B, "hi team"]]);
  for (const page of [a1, a2, b]) {
    const seen = JSON.stringify(await shown(page));
    if (seen !== expectGroup) throw new Error(`${page.name} shows the group as ${seen}, expected ${expectGroup}`);
  }
  // The 1:1 conversation moves back to the top when it gets a new message.
  await openConv(b, P);
  await write(b, "back to 1:1");
  await until(a2, "A on device 2 lists the 1:1 conversation first again, with 1 unread", (P) => {
    const li = document.querySelector("#convs li");
    return li && li.dataset.conv === P && li.dataset.unread === "1";
  }, P);

  await b.screenshot({ path: process.env.SCREENSHOT || "/tmp/rim-chat.png" });
  console.log("chat demo: ok");
} finally {
  await browser.close();
}
