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


def from_validation(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The first pydantic error of a request body as a 400 naming the field."""
    if not errors:
        return bad_request("invalid request body")
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    # a union reports each branch under its type name (str, list[int], ...): drop those
    loc = [p for p in loc if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    param = field_path(loc) or None
    if err.get("type") == "extra_forbidden":
        return bad_request(f"{param}: not supported by kvserve", param)
    if err.get("type") in ("json_invalid", "model_attributes_type") and param is None:
        return bad_request(f"request body: {err.get('msg', 'invalid JSON')}")
    return bad_request(f"{param or 'request body'}: {err.get('msg', 'invalid value')}", param)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "literal"}
