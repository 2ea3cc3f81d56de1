"""
Test helpers for TLS and HTTP/2: a self-signed certificate and an h2 client.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hyperframe.frame import Frame
from support import RawClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS, trustRootFromCertificates
from twisted.internet.ssl import Certificate
from twisted.python.failure import Failure

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class TLSFiles:
    """
    A self-signed certificate for C{localhost} and its key, as PEM files.
    """

    certfile: str
    keyfile: str
    certificate_pem: bytes


def make_tls_files(directory: Path) -> TLSFiles:
    """
    Write a fresh self-signed certificate for localhost and its key.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    certfile = directory / "cert.pem"
    keyfile = directory / "key.pem"
    certfile.write_bytes(certificate_pem)
    keyfile.write_bytes(key_pem)
    return TLSFiles(str(certfile), str(keyfile), certificate_pem)


def client_tls_options(tls: TLSFiles, protocols: list[bytes] | None) -> object:
    """
    Client TLS options that trust C{tls}'s certificate and offer C{protocols}.
    """
    trust = trustRootFromCertificates([Certificate.loadPEM(tls.certificate_pem)])
    return optionsForClientTLS("localhost", trustRoot=trust, acceptableProtocols=protocols)


async def connect_protocol(
    port: int, protocol: Protocol, tls: TLSFiles | None = None, alpn: list[bytes] | None = None
) -> Protocol:
    """
    Connect C{protocol} to 127.0.0.1:C{port}, over TLS when C{tls} is given.
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    if tls is not None:
        endpoint = wrapClientTLS(client_tls_options(tls, alpn), endpoint)
    return await connectProtocol(endpoint, protocol)


async def connect_raw_tls(port: int, tls: TLSFiles, alpn: list[bytes] | None = None) -> RawClient:
    """
    Open a raw client connection over TLS, offering C{alpn} protocols.
    """
    return await connect_protocol(port, RawClient(), tls, alpn)


@dataclass
class H2Response:
    """
    The response on one HTTP/2 stream.
    """

    stream_id: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    ended: bool = False
    reset_code: int | None = None
    informational: list[list[tuple[bytes, bytes]]] = field(default_factory=list)

    @property
    def status(self) -> int:
        return int(dict(self.headers)[b":status"])

    def header(self, name: bytes) -> bytes | None:
        """
        Return the first value of the header C{name}, or None.
        """
        for key, value in self.headers:
            if key == name:
                return value
        return None


class H2Client(Protocol):
    """
    An HTTP/2 client on the h2 state machine that also records every frame.

    :ivar frames: every frame the server sent, parsed by hyperframe.
    :ivar auto_window_update: acknowledge received DATA at once, so that the
        server's send windows stay open.
    """

    def __init__(self, *, settings: dict[int, int] | None = None) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.settings = settings
        self.frames: list[Frame] = []
        self.responses: dict[int, H2Response] = {}
        self.auto_window_update = True
        self.scheme = "http"
        self.closed = False
        self.gave_up = False
        self._frame_buffer = b""
        self._raw_mode = False
        self._waiting: list[Deferred[None]] = []

    # Protocol

    def connectionMade(self) -> None:
        self.conn.initiate_connection()
        if self.settings:
            # h2's first SETTINGS frame has the default values; changes go
            # in a second one, which the server also reads before requests.
            self.conn.update_settings(self.settings)
        self.flush()

    def dataReceived(self, data: bytes) -> None:
        self._record_frames(data)
        if not self._raw_mode:
            for event in self.conn.receive_data(data):
                self._handle(event)
            self.flush()
        self._wake()

    def connectionLost(self, reason: Failure) -> None:
        self.closed = True
        self._wake()

    # Sending

    def flush(self) -> None:
        """
        Send whatever the h2 state machine has queued.
        """
        data = self.conn.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def send_raw(self, data: bytes) -> None:
        """
        Write bytes as they are and stop feeding the h2 state machine.

        After this the client only records frames: the bytes sent may have
        broken the protocol, so its own state no longer matches the server's.
        """
        self.flush()
        self._raw_mode = True
        self.transport.write(data)

    def request(
        self,
        path: str = "/",
        *,
        method: str = "GET",
        headers: list[tuple[str, str]] = (),
        body: bytes | None = None,
    ) -> int:
        """
        Send a request on a new stream and return the stream id.
        """
        stream_id = self.conn.get_next_available_stream_id()
        request_headers = [
            (":method", method),
            (":scheme", self.scheme),
            (":authority", "localhost"),
            (":path", path),
            *headers,
        ]
        self.conn.send_headers(stream_id, request_headers, end_stream=body is None)
        if body is not None:
            self.conn.send_data(stream_id, body, end_stream=True)
        self.responses[stream_id] = H2Response(stream_id)
        self.flush()
        return stream_id

    def start_request(
        self, path: str = "/", *, method: str = "POST", headers: list[tuple[str, str]] = ()
    ) -> int:
        """
        Send request headers without ending the stream, for a body to follow.
        """
        stream_id = self.conn.get_next_available_stream_id()
        request_headers = [
            (":method", method),
            (":scheme", self.scheme),
            (":authority", "localhost"),
            (":path", path),
            *headers,
        ]
        self.conn.send_headers(stream_id, request_headers)
        self.responses[stream_id] = H2Response(stream_id)
        self.flush()
        return stream_id

    async def send_body(self, stream_id: int, body: bytes, *, end_stream: bool = True) -> None:
        """
        Send C{body} on C{stream_id} as the server's flow-control windows allow.

        :raises ConnectionError: if the connection closed first.
        """
        view = memoryview(body)
        while view:
            await self.wait_for(lambda: self.conn.local_flow_control_window(stream_id) > 0)
            if self.closed:
                raise ConnectionError(f"closed while sending the body of stream {stream_id}")
            size = min(
                len(view),
                self.conn.local_flow_control_window(stream_id),
                self.conn.max_outbound_frame_size,
            )
            self.conn.send_data(stream_id, bytes(view[:size]))
            self.flush()
            view = view[size:]
        if end_stream:
            self.conn.end_stream(stream_id)
            self.flush()

    # Waiting

    async def wait_for(self, condition, *, give_up_after: float = 10.0) -> None:
        """
        Wait until C{condition()} is true or the connection closes.

        :param give_up_after: seconds after which a test that would otherwise
            hang aborts the connection and fails.
        :raises TimeoutError: if neither happened in time.
        """
        if condition() or self.closed:
            return
        timer = reactor.callLater(give_up_after, self._give_up)
        try:
            while not condition() and not self.closed:
                waiting: Deferred[None] = Deferred()
                self._waiting.append(waiting)
                await waiting
        finally:
            if timer.active():
                timer.cancel()
        if self.gave_up:
            raise TimeoutError(f"gave up after {give_up_after} seconds")

    async def response(self, stream_id: int) -> H2Response:
        """
        Wait for the whole response on C{stream_id}.

        :raises ConnectionError: if the connection closed first.
        """
        response = self.responses[stream_id]
        await self.wait_for(lambda: response.ended or response.reset_code is not None)
        if not (response.ended or response.reset_code is not None):
            raise ConnectionError(f"closed before the end of stream {stream_id}")
        return response

    async def wait_closed(self) -> None:
        """
        Wait until the server closes the connection.
        """
        await self.wait_for(lambda: False)

    def frames_of(self, frame_type: type) -> list[Frame]:
        """
        Return the received frames of one hyperframe class.
        """
        return [frame for frame in self.frames if isinstance(frame, frame_type)]

    # Internals

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.InformationalResponseReceived):
            self.responses[event.stream_id].informational.append(event.headers)
        elif isinstance(event, h2.events.ResponseReceived):
            self.responses[event.stream_id].headers.extend(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            self.responses[event.stream_id].body += event.data
            if self.auto_window_update and event.flow_controlled_length:
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
        elif isinstance(event, h2.events.StreamEnded):
            self.responses[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.responses[event.stream_id].reset_code = event.error_code

    def _record_frames(self, data: bytes) -> None:
        self._frame_buffer += data
        while len(self._frame_buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._frame_buffer[:9]))
            if len(self._frame_buffer) < 9 + length:
                return
            frame.parse_body(memoryview(self._frame_buffer[9 : 9 + length]))
            self.frames.append(frame)
            self._frame_buffer = self._frame_buffer[9 + length :]

    def _give_up(self) -> None:
        self.gave_up = True
        self.transport.abortConnection()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, []
        for deferred in waiting:
            deferred.callback(None)


async def connect_h2(
    port: int,
    tls: TLSFiles | None = None,
    *,
    settings: dict[int, int] | None = None,
) -> H2Client:
    """
    Open an HTTP/2 connection: prior knowledge in cleartext, ALPN over TLS.
    """
    client = H2Client(settings=settings)
    client.scheme = "https" if tls else "http"
    await connect_protocol(port, client, tls, [b"h2"])
    return client
