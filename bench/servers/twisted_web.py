"""
The floors of desperados' own stack, written by hand on twisted.web.

``python twisted_web.py plain PORT`` serves a leaf Resource answering 404 on
every path.  ``python twisted_web.py autobahn PORT`` does the same but hands
WebSocket upgrades to Autobahn's ``WebSocketResource`` with an echo protocol
that accepts permessage-deflate when the client offers it.
Neither writes an access log, like ``twistd desperados``.
"""

from __future__ import annotations

import sys

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site


class QuietSite(Site):
    def log(self, request):
        pass


class NotFound(Resource):
    isLeaf = True

    def render(self, request):
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found"


def accept_deflate(offers):
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


class Echo(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


class NotFoundOrWebSocket(NotFound):
    def __init__(self):
        super().__init__()
        factory = WebSocketServerFactory()
        factory.protocol = Echo
        factory.setProtocolOptions(perMessageCompressionAccept=accept_deflate)
        self.websocket = WebSocketResource(factory)

    def render(self, request):
        if (request.getHeader(b"upgrade") or b"").lower() == b"websocket":
            return self.websocket.render(request)
        return super().render(request)


def main(kind: str, port: int) -> None:
    root = NotFound() if kind == "plain" else NotFoundOrWebSocket()
    reactor.listenTCP(port, QuietSite(root), interface="127.0.0.1")
    print(f"listening on 127.0.0.1:{port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
