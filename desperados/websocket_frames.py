"""
The frame fast paths of the WebSocket bridge around Autobahn's per-frame work.

L{FastFrameProtocol} reads complete unfragmented messages without Autobahn's
frame parser, writes a message as one frame without C{sendMessage}, unmasks
short frames in Python and checks a text frame that is a whole message with
one C{decode}.  Whatever these paths do not take is left to Autobahn.
L{desperados.websocket.HandlerProtocol} is built on it.
"""

from __future__ import annotations

from typing import Any

from autobahn.exception import PayloadExceededError
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.xormasker import create_xor_masker

# Frames shorter than this are unmasked with Python integers (_PythonMasker,
# _unmask): on the benchmark machine it took 0.6 microseconds for 16 bytes
# and 4.4 for 1,024, where building and running Autobahn's C masker took 5
# to 7 at any length.
_PYTHON_MASKER_LIMIT = 1024

# The result of Autobahn's UTF-8 validators: valid so far, ends on a code
# point boundary, and the octet index in this chunk and in the whole message.
_Utf8State = tuple[bool, bool, int, int]


class FastFrameProtocol(WebSocketServerProtocol):
    """
    Autobahn's server protocol with fast paths for whole frames.

    Each override keeps Autobahn 26.11's behaviour.  A subclass calls
    L{_between_messages} and L{_receive_whole_messages} from its
    C{dataReceived}, and sends data messages with L{_send_message}.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        self.utf8validator = _WholeMessageUtf8Validator(self, self.utf8validator)
        # Frames are unmasked by onFrameBegin's masker; with applyMask left on,
        # Autobahn would also build one of its own for every frame.
        self.applyMask = False

    def _between_messages(self) -> bool:
        # True when Autobahn's parser has nothing buffered and no frame or
        # message started, and no option turns on logging or timing frames.
        return (
            self.state == self.STATE_OPEN
            and not self.data
            and self.current_frame is None
            and not self.inside_message
            and not self.failedByMe
            and not self.logOctets
            and not self.logFrames
            and not self.trackedTimings
            and self._listeners is None
            and self._parent is None
        )

    def _receive_whole_messages(self, data: bytes) -> bytes:
        """
        Deliver the complete unfragmented messages at the start of C{data}.

        Autobahn 26.11 parses a frame in several steps (header, payload,
        frame end, message end), each one a method call that updates the
        parser's state.  A masked text or binary frame with FIN set and no
        RSV bit, read whole, is a message by itself: this delivers it with
        the checks, statistics and callbacks those steps would make.
        Anything else, and a frame that breaks a limit or contains invalid
        UTF-8, stops the loop and is left for Autobahn, which fails the
        connection as before.

        :returns: the bytes from the first frame not delivered here on.
        """
        offset = 0
        end = len(data)
        stats = self.trafficStats
        while end - offset >= 6 and self.state == self.STATE_OPEN:
            first = data[offset]
            second = data[offset + 1]
            if (first != 0x81 and first != 0x82) or second < 0x80:
                break
            length = second & 0x7F
            start = offset + 2
            if length == 126:
                length = int.from_bytes(data[start : start + 2], "big")
                start += 2
                if length < 126:
                    break
            elif length == 127:
                break
            stop = start + 4 + length
            if stop > end:
                break
            if (
                0 < self.maxFramePayloadSize < length
                or 0 < self.maxMessagePayloadSize < length
            ):
                break
            payload = _unmask(data[start + 4 : stop], data[start : start + 4])
            is_binary = first == 0x82
            if not is_binary and self.utf8validateIncoming:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    break
            offset = stop

            stats.incomingOctetsWebSocketLevel += length
            stats.incomingOctetsAppLevel += length
            stats.incomingWebSocketFrames += 1
            stats.incomingWebSocketMessages += 1
            if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()
            self.message_is_binary = is_binary
            self._onMessage(payload, is_binary)
        return data[offset:] if offset else data

    # Autobahn fast paths: each override below keeps upstream's behaviour and
    # leaves out work that upstream does on every frame for nothing.

    def sendData(
        self, data: bytes, sync: bool = False, chopsize: int | None = None
    ) -> None:
        # Autobahn 26.11's sendData formats a debug message with terminal
        # colours (click.style) on every write, even with debug logging off:
        # about a sixth of the CPU time of a small echo.  Writes on an open
        # connection that Autobahn would pass straight to the transport go
        # there here too; queued, chopped and logged writes use Autobahn's.
        plain = self.state == self.STATE_OPEN and not self.logOctets
        if sync or chopsize or self.send_queue or not plain:
            super().sendData(data, sync, chopsize)
            return
        self.transport.write(data)
        self.trafficStats.outgoingOctetsWireLevel += len(data)

    def onFrameBegin(self) -> None:
        # Autobahn 26.11 builds a C (cffi) XOR masker for every masked frame,
        # which costs about 5 microseconds however short the frame: more than
        # unmasking a 16-byte payload in Python.  Short frames get a Python
        # masker, longer ones Autobahn's.
        frame = self.current_frame
        if frame.mask is not None and frame.length > 0:
            if frame.length < _PYTHON_MASKER_LIMIT:
                self.current_frame_masker = _PythonMasker(frame.mask)
            else:
                self.current_frame_masker = create_xor_masker(frame.mask, frame.length)
        super().onFrameBegin()

    def onMessageEnd(self) -> None:
        # Autobahn 26.11's onMessageEnd also fires its "message" event for
        # listeners added with .on(), which allocates a Deferred per message
        # even when nothing listens, as here.
        if self._listeners is not None or self._parent is not None:
            super().onMessageEnd()
            return
        if not self.failedByMe:
            self._onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None

    def _send_message(self, payload: bytes, is_binary: bool) -> None:
        # Autobahn 26.11's sendMessage and sendFrame check their arguments,
        # and handle fragmentation, masking, logging and write queues, on
        # every message.  A message that goes out as one unmasked frame,
        # compressed or not, is framed and counted here as they would do.
        if type(payload) is not bytes:
            # Autobahn's type check rejects it.
            self.sendMessage(payload, isBinary=is_binary)
            return
        if (
            self.autoFragmentSize > 0
            or self.maskServerFrames
            or self.logFrames
            or self.logOctets
            or self.trackedTimings
            or self.send_queue
        ):
            self.sendMessage(payload, isBinary=is_binary)
            return

        stats = self.trafficStats
        stats.outgoingWebSocketMessages += 1
        stats.outgoingOctetsAppLevel += len(payload)
        first = 0x82 if is_binary else 0x81
        extension = self._perMessageCompress
        if extension is not None:
            extension.start_compress_message()
            payload = extension.compress_message_data(payload)
            payload += extension.end_compress_message()
            # RSV1 marks a compressed message (RFC 7692 section 6).
            first |= 0x40
        length = len(payload)
        stats.outgoingOctetsWebSocketLevel += length
        if 0 < self.maxMessagePayloadSize < length:
            # Autobahn checks the size after compressing, so a message under
            # the limit can still exceed it compressed.
            self.wasMaxMessagePayloadSizeExceeded = True
            msg = (
                f"tried to send WebSocket message with size {length} exceeding "
                f"payload limit of {self.maxMessagePayloadSize} octets"
            )
            self.log.warn(msg)
            raise PayloadExceededError(msg)

        if length < 126:
            header = bytes((first, length))
        elif length < 0x10000:
            header = bytes((first, 126)) + length.to_bytes(2, "big")
        else:
            header = bytes((first, 127)) + length.to_bytes(8, "big")
        frame = header + payload
        stats.outgoingWebSocketFrames += 1
        stats.outgoingOctetsWireLevel += len(frame)
        self.transport.write(frame)


def _unmask(payload: bytes, mask: bytes) -> bytes:
    """
    Unmask a whole frame payload (RFC 6455 section 5.3).
    """
    length = len(payload)
    if length >= _PYTHON_MASKER_LIMIT:
        return create_xor_masker(mask, length).process(payload)
    key = (mask * (length // 4 + 1))[:length]
    unmasked = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return unmasked.to_bytes(length, "little")


class _PythonMasker:
    """
    Unmask a frame payload (RFC 6455 section 5.3) with Python integers.

    It has the interface of Autobahn's maskers: C{process} returns the
    unmasked bytes and C{pointer} counts the payload bytes processed so far.
    """

    __slots__ = ("_mask", "_pointer")

    def __init__(self, mask: bytes) -> None:
        self._mask = mask
        self._pointer = 0

    def pointer(self) -> int:
        return self._pointer

    def reset(self) -> None:
        self._pointer = 0

    def process(self, data: bytes) -> bytes:
        length = len(data)
        offset = self._pointer % 4
        key = (self._mask * ((offset + length) // 4 + 1))[offset : offset + length]
        self._pointer += length
        unmasked = int.from_bytes(data, "little") ^ int.from_bytes(key, "little")
        return unmasked.to_bytes(length, "little")


class _WholeMessageUtf8Validator:
    """
    Autobahn's incremental UTF-8 validator with a shortcut for whole messages.

    Autobahn 26.11 checks every text payload with its incremental validator,
    which ran at about 430 MB/s on the project's 2-core benchmark machine
    (38 microseconds per 16 KiB) where C{bytes.decode} took about 1.3.  A
    frame that is a whole text message, read in one piece, is checked here
    with one C{decode}.  A fragmented message, or a frame that arrives over
    several reads, keeps the incremental check, so invalid UTF-8 still fails
    the connection before the rest of the message arrives (RFC 6455 section
    8.1).  An invalid whole message goes to the incremental validator too,
    which reports the position of the error.
    """

    __slots__ = ("_incremental", "_protocol", "_started")

    def __init__(self, protocol: WebSocketServerProtocol, incremental: Any) -> None:
        self._protocol = protocol
        self._incremental = incremental
        self._started = False

    def reset(self) -> None:
        self._incremental.reset()
        self._started = False

    def validate(self, payload: bytes) -> _Utf8State:
        started, self._started = self._started, True
        frame = self._protocol.current_frame
        if (
            not started
            and frame.fin
            and frame.opcode == 1
            and self._protocol.current_frame_masker.pointer() == frame.length
        ):
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                pass
            else:
                return True, True, len(payload), len(payload)
        return self._incremental.validate(payload)
