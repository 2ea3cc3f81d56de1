"""
The contracts between desperados and the code it runs: plugs and WebSocket handlers.
"""

from __future__ import annotations

from zope.interface import Interface


class IPlug(Interface):
    """
    A step of a request pipeline.

    A plug is built once, when the pipeline is built, and then called for
    every request.  Whatever it needs per request lives on the L{Conn}; the
    plug object itself is shared by all requests and must not be changed by
    C{call}.
    """

    def init(opts: object) -> object:
        """
        Prepare the plug's state from the options given in the pipeline.

        Called once, when the pipeline is built, so expensive validation and
        compilation belong here.  Bad options raise L{TypeError} or
        L{ValueError} at that time rather than on the first request.

        :param opts: the options written next to the plug in the pipeline.
        :returns: the state passed to every C{call}.
        """

    def call(conn: object, state: object) -> object:
        """
        Handle one request.

        :param conn: the request's L{desperados.Conn}.
        :param state: the value returned by C{init}; never changed here.
        :returns: the Conn, a L{twisted.internet.defer.Deferred} that fires
            with it, or an awaitable of it (C{call} may be a coroutine).
            A plug that answered the request or handed it elsewhere halts the
            Conn so that later plugs are skipped.
        """


class IWebSock(Interface):
    """
    A WebSocket handler, driven by desperados once a plug upgraded a request.

    The handler is shared by all connections it serves; each connection has
    its own state, threaded through the callbacks.  Every callback returns a
    result from L{desperados.websock}: L{Ok} to go on with a new state,
    L{Push} to send frames and go on, or L{Stop} to close the connection.
    A callback may also return a Deferred of such a result, or be a coroutine.
    Callbacks of one connection never overlap: the next event waits until the
    previous result is known.

    A callback that raises closes the connection with code 1011, and the
    error is logged with its traceback.
    """

    def init(state: object) -> object:
        """
        Start a connection once the WebSocket handshake is complete.

        :param state: the initial state given to C{conn.upgrade}.
        :returns: a result (L{Ok}, L{Push} or L{Stop}).
        """

    def handle_in(frame: tuple[bytes, str], state: object) -> object:
        """
        Handle one complete text or binary message.

        :param frame: C{(data, opcode)}, where C{data} is the message's bytes
            (text messages are valid UTF-8 unless validation was turned off)
            and C{opcode} is C{"text"} or C{"binary"}.
        :param state: the connection's current state.
        :returns: a result (L{Ok}, L{Push} or L{Stop}).
        """

    def handle_info(message: object, state: object) -> object:
        """
        Handle a message sent to this connection from elsewhere in the process.

        Messages are sent with L{desperados.websock.WebSocketHandle.send}.

        :param message: the object given to C{send}.
        :param state: the connection's current state.
        :returns: a result (L{Ok}, L{Push} or L{Stop}).
        """

    def terminate(reason: object, state: object) -> None:
        """
        Release what the connection held; called exactly once per connection.

        Called whatever ended a connection whose C{init} ran: a close by
        either side, the idle timeout, a server shutdown, a lost transport or
        an exception in a callback.  Its return value is ignored and it cannot
        send frames.

        :param reason: a L{desperados.websock.CloseReason}.
        :param state: the connection's last state.
        """


class IWebSockControl(Interface):
    """
    The optional part of a WebSocket handler: control frames.

    Pongs to pings are sent automatically whether or not the handler provides
    this interface.
    """

    def handle_control(frame: tuple[bytes, str], state: object) -> object:
        """
        Handle a ping or pong frame.

        :param frame: C{(data, opcode)} with C{opcode} C{"ping"} or C{"pong"}.
        :param state: the connection's current state.
        :returns: a result (L{Ok}, L{Push} or L{Stop}).
        """


__all__ = ["IPlug", "IWebSock", "IWebSockControl"]
