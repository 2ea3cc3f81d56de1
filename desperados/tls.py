"""
TLS for the server: certificate options from PEM files and a TLS endpoint.

ALPN is not configured here: every connection created by a
L{twisted.web.server.Site} offers what the Site's C{acceptableProtocols()}
returns (C{h2}, then C{http/1.1}), because Twisted's TLS layer queries the
wrapped factory through C{IProtocolNegotiationFactory}.  That holds for the
options built here and for C{ssl:} endpoint descriptions alike.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.defer import Deferred
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer


def certificate_options(certfile: str, keyfile: str) -> CertificateOptions:
    """
    Load a server certificate, its chain and its private key from PEM files.

    :param certfile: the server certificate first, then any intermediate
        certificates that clients need to build the chain.
    :param keyfile: the unencrypted private key of the certificate.
    :raises ValueError: if a file contains no certificate or no usable key,
        or if the key does not belong to the certificate.
    :raises OSError: if a file cannot be read.
    """
    certificates = x509.load_pem_x509_certificates(Path(certfile).read_bytes())
    try:
        key = load_pem_private_key(Path(keyfile).read_bytes(), password=None)
    except (TypeError, ValueError) as error:
        msg = f"expected an unencrypted PEM private key in {keyfile!r}: {error}"
        raise ValueError(msg) from None
    if key.public_key() != certificates[0].public_key():
        msg = f"the key in {keyfile!r} does not match the certificate in {certfile!r}"
        raise ValueError(msg)
    return CertificateOptions(
        privateKey=key,
        certificate=certificates[0],
        extraCertChain=certificates[1:],
    )


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """
    Serve TLS on top of another stream server endpoint (TCP, UNIX, ...).

    :param wrapped: the endpoint that accepts the encrypted connections.
    :param options: the server's TLS settings, such as the result of
        L{certificate_options}.
    """

    def __init__(self, wrapped: IStreamServerEndpoint, options: CertificateOptions) -> None:
        self.wrapped = wrapped
        self.options = options

    def __repr__(self) -> str:
        return f"TLSServerEndpoint({self.wrapped!r})"

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.wrapped.listen(TLSMemoryBIOFactory(self.options, False, protocolFactory))
