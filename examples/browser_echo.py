"""
A page that talks to the WebSocket echo from the browser.

Run it from the repository root and open http://localhost:8082/::

    PYTHONPATH=examples twistd -n desperados --plug browser_echo.App

The page opens a WebSocket to its own address, sends a text message, a
binary message, C{ping\\n} and a long text (which permessage-deflate
compresses), and shows what came back.  The test in
C{tests/test_browser.py} opens it in headless Chromium and reads
C{window.results}.
"""

from __future__ import annotations

from desperados import Builder, Conn, endpoints
from desperados.plugs import Websocket

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>desperados echo</title>
<pre id="log"></pre>
<script>
const results = { done: false, extensions: null, messages: [], closeCode: null };
window.results = results;
const show = (line) => { document.getElementById("log").textContent += line + "\\n"; };
const long = "\\u00e9cho ".repeat(4000);
const sent = ["hello", new Uint8Array([0, 1, 2, 255]), "ping\\n", long];

const socket = new WebSocket(location.href.replace(/^http/, "ws"));
socket.binaryType = "arraybuffer";
socket.onopen = () => {
  results.extensions = socket.extensions;
  show("open, extensions: " + (socket.extensions || "none"));
  for (const message of sent) socket.send(message);
};
socket.onmessage = (event) => {
  const text = typeof event.data === "string";
  const data = text ? event.data : Array.from(new Uint8Array(event.data));
  results.messages.push({ type: text ? "text" : "binary", data });
  show((text ? "text " : "binary ") + JSON.stringify(data).slice(0, 60));
  if (results.messages.length === sent.length) socket.close(1000);
};
socket.onclose = (event) => {
  results.closeCode = event.code;
  results.done = true;
  show("closed with " + event.code);
};
</script>
"""


def page(conn: Conn, opts: object) -> Conn:
    """
    Send the page for C{GET /}; leave every other request to later plugs.
    """
    if conn.method not in ("GET", "HEAD") or conn.path_info:
        return conn
    conn.put_resp_header("content-type", "text/html; charset=utf-8")
    return conn.send_resp(200, PAGE).halt()


class App(Builder):
    """
    The echo on every path, and the page at C{/}.
    """

    plugs = [Websocket, endpoints.Websocket, page, endpoints.HTTP]
