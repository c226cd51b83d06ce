"""OpenAI error objects: {"error": {"message", "type", "param", "code"}} with their status."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=dict(self.headers))


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def field_path(loc: Sequence[Any]) -> str:
    """pydantic's error location as OpenAI's param: messages[0].content, stop."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _param_loc(loc: Sequence[Any]) -> list[Any]:
    # drop "body", and the branch names a union reports each alternative under
    return [
        p for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))
    ]


def from_validation(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The first pydantic error of a request body as a 400 naming the field.

    A union (content: str | list[part]) reports one error per alternative; the deepest one
    under the first error's field says best what is wrong.
    """
    if not errors:
        return bad_request("invalid request body")
    err, loc = errors[0], _param_loc(errors[0].get("loc", ()))
    if err.get("type") == "json_invalid":
        return bad_request(f"request body: {err.get('msg', 'invalid JSON')}")
    for other in errors[1:]:
        other_loc = _param_loc(other.get("loc", ()))
        if len(other_loc) > len(loc) and other_loc[: len(loc)] == loc:
            err, loc = other, other_loc
    param = field_path(loc) or None
    if err.get("type") == "extra_forbidden":
        return bad_request(f"{param}: not supported by kvserve", param)
    return bad_request(f"{param or 'request body'}: {err.get('msg', 'invalid value')}", param)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "literal"}
