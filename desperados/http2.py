"""
HTTP/2 connections: twisted.web's H2Connection with RFC 9113 corrections.
"""

from __future__ import annotations

from twisted.web._http2 import H2Connection as _TwistedH2Connection


class H2Connection(_TwistedH2Connection):
    """
    twisted.web's HTTP/2 connection, corrected where it breaks RFC 9113.
    """
