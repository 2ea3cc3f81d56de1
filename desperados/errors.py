"""
Exceptions raised by desperados, each carrying the HTTP status it maps to.
"""

from __future__ import annotations


class DesperadosError(Exception):
    """
    Base class of desperados' errors.

    The message of a subclass with a 4xx status is sent to the client as the
    response body, so it names what was wrong without repeating request data.

    :ivar status: the HTTP status a request that hit this error is answered
        with; 500 unless a subclass says otherwise.
    :ivar headers: response headers to send with the error, as
        C{(name, value)} pairs.
    """

    status = 500

    def __init__(self, message: str, *, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.headers = headers


class AlreadySentError(DesperadosError):
    """
    A plug tried to change or send a response that was already sent.
    """


class BadRequestError(DesperadosError):
    """
    The request is malformed; it is answered with 400.
    """

    status = 400


class UpgradeRequiredError(DesperadosError):
    """
    The request asked for a protocol version we do not speak; answered with 426.
    """

    status = 426


class ForbiddenError(DesperadosError):
    """
    The request is well-formed but not allowed, for example its Origin; 403.
    """

    status = 403


class RequestTimeoutError(DesperadosError):
    """
    The client did not send the request body in time; answered with 408.
    """

    status = 408


class BodyTooLargeError(DesperadosError):
    """
    The request body is larger than the server accepts; answered with 413.
    """

    status = 413


class ExpectationFailedError(DesperadosError):
    """
    The request's Expect header has an expectation other than
    C{100-continue}; the request gets 417.
    """

    status = 417


class ClientDisconnectedError(DesperadosError):
    """
    The client closed the connection, so the response cannot be sent.

    The HTTP bridge logs it at debug level, not as an error: nobody is left
    to answer.
    """
