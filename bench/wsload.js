// WebSocket load client for bench/run.py.
//
//   node wsload.js URL MODE CONNS SIZE WARMUP_S DURATION_S [deflate]
//
// MODE is "pingpong" (one message in flight per connection), "burst" (32 in
// flight per connection) or "idle" (open CONNS connections, echo one message
// on each, print "open", then hold them until stdin closes).  Messages are
// text frames of SIZE ASCII bytes; every echo is checked for its length.
// Prints "measure start" and "measure end" when the timed window opens and
// closes, then one JSON line: messages echoed in the window, the rate, and
// this process's CPU time in the window (its share of one core).  With
// "deflate" the client offers permessage-deflate (RFC 7692), and the JSON
// says whether every connection negotiated it.
"use strict";
const WebSocket = require("ws");

const [url, mode, connsText, sizeText, warmupText, durationText, extension] =
  process.argv.slice(2);
const conns = Number(connsText);
const size = Number(sizeText);
const warmup = Number(warmupText || 0) * 1000;
const duration = Number(durationText || 0) * 1000;
const window = mode === "burst" ? 32 : 1;
const deflate = extension === "deflate";
const options = { perMessageDeflate: deflate, skipUTF8Validation: true, maxPayload: 0 };
// Text that compresses about as well as ordinary JSON, not a run of one byte.
const words = "the quick brown fox jumps over a lazy dog while 42 cats watch ";
const payload = Buffer.from(words.repeat(Math.ceil(size / words.length)).slice(0, size));

let echoed = 0;
let running = true;
let failed = null;
const sockets = [];

function fail(message) {
  if (failed === null) {
    failed = message;
    console.log(JSON.stringify({ error: message }));
    process.exit(2);
  }
}

function open(index) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, options);
    ws.on("open", () => resolve(ws));
    ws.on("error", (error) => fail(`connection ${index}: ${error.message}`));
    ws.on("close", (code) => {
      if (running) fail(`connection ${index} closed by the server with ${code}`);
    });
    sockets.push(ws);
  });
}

async function openAll(count, concurrency) {
  const opened = [];
  for (let start = 0; start < count; start += concurrency) {
    const batch = [];
    for (let i = start; i < Math.min(count, start + concurrency); i++) batch.push(open(i));
    opened.push(...(await Promise.all(batch)));
  }
  return opened;
}

function echoOnce(ws) {
  return new Promise((resolve) => {
    ws.once("message", (data) => {
      if (data.length !== size) fail(`expected ${size} bytes back, got ${data.length}`);
      resolve();
    });
    ws.send(payload, { binary: false });
  });
}

async function idle() {
  const opened = await openAll(conns, 50);
  for (let start = 0; start < opened.length; start += 50) {
    await Promise.all(opened.slice(start, start + 50).map(echoOnce));
  }
  console.log("open");
  process.stdin.resume();
  process.stdin.on("end", () => {
    running = false;
    for (const ws of opened) ws.terminate();
    process.exit(0);
  });
}

async function load() {
  const opened = await openAll(conns, 50);
  for (const ws of opened) {
    ws.on("message", (data) => {
      if (data.length !== size) fail(`expected ${size} bytes back, got ${data.length}`);
      echoed++;
      if (running) ws.send(payload, { binary: false });
    });
    for (let i = 0; i < window; i++) ws.send(payload, { binary: false });
  }
  await new Promise((resolve) => setTimeout(resolve, warmup));
  console.log("measure start");
  const count0 = echoed;
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  await new Promise((resolve) => setTimeout(resolve, duration));
  const count1 = echoed;
  const cpu = process.cpuUsage(cpu0);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  console.log("measure end");
  running = false;
  const cpuSeconds = (cpu.user + cpu.system) / 1e6;
  console.log(
    JSON.stringify({
      messages: count1 - count0,
      seconds,
      rate: (count1 - count0) / seconds,
      client_cpu: cpuSeconds / seconds,
      deflate: opened.every((ws) => ws.extensions.split(",").includes("permessage-deflate")),
    })
  );
  for (const ws of opened) ws.terminate();
  process.exit(0);
}

(mode === "idle" ? idle() : load()).catch((error) => fail(String(error)));
