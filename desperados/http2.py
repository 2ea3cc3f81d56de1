"""
HTTP/2 connections: twisted.web's H2Connection with RFC 9113 corrections.

Each correction overrides one method of twisted.web's
C{twisted.web._http2.H2Connection} (Twisted 26.10), and its comment states
what upstream does.  The request handling itself stays Twisted's.
"""

from __future__ import annotations

from typing import Any

import h2.errors
import h2.exceptions
from h2.connection import ConnectionState
from h2.frame_buffer import FrameBuffer
from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._http2 import _END_STREAM_SENTINEL
from twisted.web._http2 import H2Connection as _TwistedH2Connection

from desperados._logging import observer as log_observer


class FieldBlockDecodingError(h2.exceptions.ProtocolError):
    """
    A header block that HPACK cannot decode, a COMPRESSION_ERROR.
    """

    error_code = h2.errors.ErrorCodes.COMPRESSION_ERROR


class _FieldBlockDecoder(Decoder):
    # RFC 9113 section 4.3: a field block that fails to decode is a
    # connection error of type COMPRESSION_ERROR.  h2 4.4 turns HPACK errors
    # into a plain ProtocolError, which closes with PROTOCOL_ERROR; h2 passes
    # a ProtocolError raised here through with its error code.
    def decode(self, data: bytes, raw: bool = False) -> Any:
        try:
            return super().decode(data, raw)
        except OversizedHeaderListError:
            # h2 rejects a header list over its limit with ENHANCE_YOUR_CALM.
            raise
        except HPACKError as error:
            msg = f"invalid HPACK field block: {error}"
            raise FieldBlockDecodingError(msg) from error


class _FrameBuffer(FrameBuffer):
    # RFC 9113 section 4.2: a frame longer than SETTINGS_MAX_FRAME_SIZE is a
    # FRAME_SIZE_ERROR.  h2 4.4 checks the length only once the whole frame
    # has arrived, so a header announcing 16 MiB kept the connection
    # buffering until the idle timeout.  Check it as soon as the header is in.
    def __next__(self) -> Any:
        if len(self._data) >= 9:
            self._validate_frame_length(int.from_bytes(self._data[:3], "big"))
        return super().__next__()


class H2Connection(_TwistedH2Connection):
    """
    twisted.web's HTTP/2 connection, corrected where it breaks RFC 9113.

    - HPACK decoding errors close the connection with COMPRESSION_ERROR.
    - A frame header announcing more than SETTINGS_MAX_FRAME_SIZE closes
      the connection with FRAME_SIZE_ERROR before the payload arrives.
    - After a connection error, GOAWAY goes out and the connection closes,
      over TLS too.
    - A stream whose send window is zero or negative, after DATA or after a
      SETTINGS change, waits for WINDOW_UPDATE instead of spinning or raising.
    - A SETTINGS change that opens the send windows resumes waiting streams.
    - A response complete before its request body resets the stream with
      NO_ERROR, where upstream raised KeyError on the next DATA frame.
    - After a graceful GOAWAY (see L{refuse_streams_after}), streams the
      client opens with a higher ID are reset with REFUSED_STREAM.

    It also runs a request that can stream its body (one with
    C{headReceived}, such as desperados' C{StreamingRequest}) as soon as
    its headers arrive, like the HTTP/1.1 channel does.
    """

    _desperados_log = Logger(observer=log_observer)

    def __init__(self, reactor: Any = None) -> None:
        super().__init__(reactor)
        decoder = _FieldBlockDecoder()
        decoder.max_header_list_size = self.conn.decoder.max_header_list_size
        self.conn.decoder = decoder
        self.conn.incoming_buffer = _FrameBuffer(server=True)

    # Connection errors

    def _terminate(self, reason: Failure) -> None:
        error = reason.value
        # Upstream calls this for an h2 ProtocolError and, with a plain
        # ConnectionLost, when the peer resets streams too fast
        # (CVE-2023-44487), in which case it sends ENHANCE_YOUR_CALM.
        code = getattr(error, "error_code", h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self._desperados_log.info(
            "HTTP/2 connection error from {peer}, closing with GOAWAY {error_code}: {error}",
            peer=_peer_of(self.transport),
            error_code=code.name,
            error=str(error),
        )
        if self.conn.state_machine.state != ConnectionState.CLOSED:
            # h2 queues a GOAWAY for most errors, but not for an invalid
            # connection preface (RFC 9113 section 3.4 makes it optional).
            self.conn.close_connection(error_code=code)
        super()._terminate(reason)

    def connectionLost(self, reason: Failure, _cancelTimeouts: bool = True) -> None:
        super().connectionLost(reason, _cancelTimeouts=_cancelTimeouts)
        self._release_transport()

    def timeoutConnection(self) -> None:
        super().timeoutConnection()
        self._release_transport()

    def lose_connection(self) -> None:
        """
        Close the connection once the frames written so far are sent.

        Call this rather than C{transport.loseConnection()}, which leaves a
        TLS connection open (see L{_release_transport}).
        """
        if self.transport is not None:
            self.transport.loseConnection()
            self._release_transport()

    def _release_transport(self) -> None:
        # Upstream calls transport.loseConnection() after a connection error,
        # an idle timeout or the peer's GOAWAY, but stays registered as the
        # transport's producer.  TLSMemoryBIOProtocol sends close_notify and
        # closes only once its producer unregisters, so a TLS connection
        # stayed open after the GOAWAY until the peer gave up.
        transport = self.transport
        if transport is not None and transport.disconnecting:
            transport.unregisterProducer()

    # Streams opened after a graceful GOAWAY

    _last_stream_id: int | None = None
    _refused_count = 0

    def refuse_streams_after(self, last_stream_id: int) -> None:
        """
        Refuse every stream the client opens with an ID above C{last_stream_id}.

        Call it when a GOAWAY with that last stream ID is sent while h2's
        state machine stays open for the streams that finish (see
        C{desperados.drain}), because h2 would accept new streams then.  RFC
        9113 section 6.8 lets the server leave such streams unprocessed,
        and RST_STREAM with REFUSED_STREAM means that the client can retry
        the request on another connection.
        """
        self._last_stream_id = last_stream_id

    def _is_refused(self, stream_id: int) -> bool:
        last = self._last_stream_id
        return last is not None and stream_id > last

    def _refuse_stream(self, stream_id: int) -> None:
        self._refused_count += 1
        if self._refused_count == 1:
            # Once per connection: a client may open many streams.
            self._desperados_log.info(
                "refused HTTP/2 stream {stream_id} from {peer} and any later "
                "one: opened after GOAWAY with last stream {last_stream_id}",
                stream_id=stream_id,
                peer=_peer_of(self.transport),
                last_stream_id=self._last_stream_id,
            )
        self.conn.reset_stream(
            stream_id, error_code=h2.errors.ErrorCodes.REFUSED_STREAM
        )

    # Events on refused streams: no H2Stream exists for them.

    def _requestDataReceived(self, event: Any) -> None:
        if self._is_refused(event.stream_id):
            # Give the bytes back to the connection's flow-control window.
            self.conn.acknowledge_received_data(
                event.flow_controlled_length, event.stream_id
            )
            return
        super()._requestDataReceived(event)

    def _requestEnded(self, event: Any) -> None:
        if not self._is_refused(event.stream_id):
            super()._requestEnded(event)

    def _requestAborted(self, event: Any) -> None:
        if not self._is_refused(event.stream_id):
            super()._requestAborted(event)

    def _handlePriorityUpdate(self, event: Any) -> None:
        if not self._is_refused(event.stream_id):
            super()._handlePriorityUpdate(event)

    # Streamed request bodies

    def _requestReceived(self, event: Any) -> None:
        if self._is_refused(event.stream_id):
            self._refuse_stream(event.stream_id)
            return
        super()._requestReceived(event)
        # Upstream dispatches a request when its stream ends, so the whole
        # body is buffered first.  A request that reads its body as it
        # arrives runs now; H2Stream still reports the end of the stream.
        if event.stream_ended is not None:
            return
        stream = self.streams[event.stream_id]
        head_received = getattr(stream._request, "headReceived", None)
        if head_received is not None:
            head_received(stream.command, stream.path, b"HTTP/2")

    def _send100Continue(self, streamID: int) -> None:
        # H2Stream calls this as soon as the headers arrive, but a streaming
        # request sends 100 Continue itself when a plug starts reading.
        if not hasattr(self.requestFactory, "headReceived"):
            super()._send100Continue(streamID)

    def _requestDone(self, streamID: int) -> None:
        # RFC 9113 section 8.1: a response complete before the request body
        # may be followed by RST_STREAM with NO_ERROR, so the client stops
        # sending.  Upstream drops its own state for the stream while h2
        # still accepts DATA on it, and the next DATA frame raises KeyError
        # in _requestDataReceived, which drops the connection.
        h2_stream = self.conn.streams.get(streamID)
        if self._stillProducing and h2_stream is not None and not h2_stream.closed:
            self.conn.reset_stream(streamID, error_code=h2.errors.ErrorCodes.NO_ERROR)
            self._tryToWriteControlData()
        super()._requestDone(streamID)

    # Flow control

    def _sendPrioritisedData(self, *args: object) -> None:
        # Upstream sends from whichever stream the priority tree picks.  When
        # that stream's send window is zero, it sends nothing and calls itself
        # again at once, so it spins until WINDOW_UPDATE arrives.  When the
        # window is negative (RFC 9113 section 6.9.2), it slices the data
        # wrongly and h2 raises FlowControlError, which stops the loop for
        # good.  Blocking such streams first makes the loop wait, and
        # _handleWindowUpdate unblocks them.
        self._block_streams_without_window()
        super()._sendPrioritisedData(*args)

    def _block_streams_without_window(self) -> None:
        for stream_id, queue in self._outboundStreamQueues.items():
            if not queue or queue[0] is _END_STREAM_SENTINEL:
                continue
            if self.conn.local_flow_control_window(stream_id) <= 0:
                self.priority.block(stream_id)

    def _handleWindowUpdate(self, event: Any) -> None:
        # Upstream unblocks the streams that have data queued, but does not
        # wake the sending loop when it waits on a fully blocked tree.
        super()._handleWindowUpdate(event)
        self._wake_sender()

    def dataReceived(self, data: bytes) -> None:
        if not self._stillProducing or self.transport.disconnecting:
            # The connection is closing after a GOAWAY, so h2 is closed and
            # upstream would read any later frame as a connection error.
            return
        initial_window = self.conn.remote_settings.initial_window_size
        super().dataReceived(data)
        # RFC 9113 section 6.9.2: SETTINGS_INITIAL_WINDOW_SIZE changes the
        # send window of every open stream.  h2 adjusts the windows but emits
        # no WindowUpdated event, and upstream ignores RemoteSettingsChanged,
        # so a stream waiting for a larger window would wait forever
        # (https://github.com/twisted/twisted/issues/9914).
        if self._stillProducing and (
            self.conn.remote_settings.initial_window_size != initial_window
        ):
            self._resume_streams()

    def _resume_streams(self) -> None:
        # What upstream does for a WINDOW_UPDATE on stream 0.
        for stream_id, stream in list(self.streams.items()):
            if self._outboundStreamQueues.get(stream_id):
                self.priority.unblock(stream_id)
            stream.windowUpdated()
        self._wake_sender()

    def _wake_sender(self) -> None:
        waiting = self._sendingDeferred
        if waiting is not None:
            self._sendingDeferred = None
            waiting.callback(None)


def _peer_of(transport: Any) -> str:
    if transport is None:
        return "unknown"
    peer = transport.getPeer()
    host = getattr(peer, "host", None)
    if host is None:
        return str(peer)
    return f"{host}:{peer.port}"
