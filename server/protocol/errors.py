"""Errors in OpenAI's JSON shape, with the status codes OpenAI clients expect: raised anywhere below the HTTP
layer (serving), rendered as responses by `api/errors.py`."""

from __future__ import annotations

from shrinkserve.server.protocol.openai import ErrorBody, ErrorResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error to return to the client as `{"error": {...}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        err = ErrorBody(message=self.message, type=_TYPES.get(self.status, "api_error"), param=self.param,
                        code=self.code)
        return ErrorResponse(error=err).model_dump()


class ClientGone(APIError):
    """The client closed the connection before the answer: nobody reads this, it only counts as 499."""

    def __init__(self) -> None:
        super().__init__(499, "client closed the request", code="client_closed_request")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
