"""StructuredOutput: what a request's output must match (one JSON schema, JSON object, regex or
grammar). Shape checks only; whether the grammar engine can compile it is checked at
add_request (kvserve.grammar)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

FIELD = "SamplingParams.structured"


@dataclass
class StructuredOutput:
    """Exactly one of:

    json_schema: a JSON schema (a dict, or its JSON text); the output is one JSON value that
        validates against it.
    json_object: True: the output is any JSON object.
    regex: the whole output matches this regular expression.
    grammar: the output is a sentence of this EBNF grammar (GBNF-style, xgrammar's dialect:
        `root ::= ...`).
    """

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kind(self) -> str:
        """The one field that is set."""
        return self._given()[0]

    def schema_text(self) -> str:
        """json_schema as compact JSON text, the form compiled and cached. Keys keep their
        order: the schema's property order is the output's."""
        schema = self.json_schema
        if isinstance(schema, str):
            schema = json.loads(schema)
        return json.dumps(schema, separators=(",", ":"))

    def cache_key(self) -> tuple[str, str]:
        if self.kind == "json_schema":
            return ("json_schema", self.schema_text())
        if self.kind == "json_object":
            return ("json_object", "")
        return (self.kind, str(getattr(self, self.kind)))

    def _given(self) -> list[str]:
        given = [name for name in ("json_schema", "regex", "grammar")
                 if getattr(self, name) is not None]
        return given + ["json_object"] if self.json_object is True else given

    def validate(self) -> None:
        if not isinstance(self.json_object, bool):
            raise ValueError(  # noqa: TRY004 -- bad request fields are ValueErrors here
                f"{FIELD}.json_object: must be a bool; got {self.json_object!r}")
        given = self._given()
        if len(given) != 1:
            raise ValueError(f"{FIELD}: set exactly one of json_schema, json_object, regex, "
                             f"grammar; got {given or 'none'}")
        if self.json_schema is not None:
            _check_schema(self.json_schema)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{FIELD}.{name}: must be a non-empty string; got {value!r}")


def _check_schema(schema: object) -> None:
    name = f"{FIELD}.json_schema"
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name}: not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError(  # noqa: TRY004 -- bad request fields are ValueErrors here
            f"{name}: must be a JSON schema (an object); got {type(schema).__name__}")
    import jsonschema  # type: ignore[import-untyped]

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise ValueError(f"{name}: not a valid JSON schema"
                         f"{' at ' + where if where else ''}: {exc.message}") from None
