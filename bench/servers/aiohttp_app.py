"""
aiohttp: 404 ``not found`` on every path, WebSocket echo on every path.

``python aiohttp_app.py PORT``; no access log.
"""

import sys

from aiohttp import WSMsgType, web


async def handle(request):
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return web.Response(status=404, text="not found")
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


def main(port: int) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None)


if __name__ == "__main__":
    main(int(sys.argv[1]))
