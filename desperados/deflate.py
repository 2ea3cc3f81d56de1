"""
permessage-deflate (RFC 7692) with a limit on how far a message inflates.

Autobahn's C{PerMessageDeflate} stops inflating a message at
C{max_message_size}.  L{RatioLimitedDeflate} also stops it once its inflated
size exceeds C{max_inflate_ratio} times the compressed bytes received so far,
so that a few kilobytes cannot make the server inflate megabytes.
"""

from __future__ import annotations

from autobahn.websocket.compress import PerMessageDeflate
from autobahn.exception import PayloadExceededError


class RatioLimitedDeflate(PerMessageDeflate):
    """
    The permessage-deflate extension of one connection, with a ratio limit.

    :ivar max_inflate_ratio: see L{WebSocketOptions.max_inflate_ratio}.
    :ivar inflate_ratio_min_size: see
        L{WebSocketOptions.inflate_ratio_min_size}.
    :ivar ratio_exceeded: whether the message being received was stopped by
        the ratio limit rather than by C{max_message_size}.
    :ivar compressed_size: the compressed bytes of that message so far.
    """

    max_inflate_ratio: float | None = None
    inflate_ratio_min_size = 0
    ratio_exceeded = False
    compressed_size = 0

    @classmethod
    def replacing(
        cls,
        extension: PerMessageDeflate,
        max_inflate_ratio: float | None,
        inflate_ratio_min_size: int,
    ) -> RatioLimitedDeflate:
        """
        Return a limited copy of C{extension}, negotiated but not used yet.

        Autobahn builds the extension from the class registered for
        C{permessage-deflate}, for every server in the process, so the
        bridge replaces it after the handshake instead.
        """
        limited = cls(
            extension._is_server,
            extension.server_no_context_takeover,
            extension.client_no_context_takeover,
            extension.server_max_window_bits,
            extension.client_max_window_bits,
            extension.mem_level,
            extension.max_message_size,
        )
        limited.max_inflate_ratio = max_inflate_ratio
        limited.inflate_ratio_min_size = inflate_ratio_min_size
        return limited

    def start_decompress_message(self) -> None:
        super().start_decompress_message()
        self.ratio_exceeded = False
        self.compressed_size = 0

    def decompress_message_data(
        self, data: bytes, max_output_len: int | None = None
    ) -> bytes:
        self.compressed_size += len(data)
        ratio = self.max_inflate_ratio
        if ratio is None:
            return super().decompress_message_data(data, max_output_len)

        # Autobahn counts the inflated bytes of this message so far.
        inflated = self._decompress_message_size
        allowed_size = max(self.inflate_ratio_min_size, ratio * self.compressed_size)
        allowed = int(allowed_size) - inflated
        other_limits = [] if max_output_len is None else [max_output_len]
        if self.max_message_size is not None:
            other_limits.append(self.max_message_size - inflated)
        limited_by_ratio = not other_limits or allowed < min(other_limits)
        if limited_by_ratio:
            max_output_len = allowed
        try:
            return super().decompress_message_data(data, max_output_len)
        except PayloadExceededError:
            self.ratio_exceeded = limited_by_ratio
            raise
