"""Checking input: JSON read with a readable error, text that both stores keep as it is, marshmallow fields
that take JSON values as they are, and readable messages from marshmallow's errors."""
import json
from pathlib import Path

from marshmallow import fields

from .errors import InvalidValue


def parse_json(data, source):
    """The JSON value of `data` (text or UTF-8 bytes); ValueError naming `source` when it is not JSON (or
    nested too deeply)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{source} is nested too deeply") from None
    except ValueError as error:  # not JSON, or bytes that are not UTF-8
        raise ValueError(f"{source} is not JSON: {error}") from None


def read_json_file(path):
    """The JSON value of a file; ValueError naming the file when it is not JSON (or nested too deeply)."""
    path = Path(path)
    return parse_json(path.read_bytes(), path.name)


def storable_text(value, what, limit=None):
    """value, if it is text that both stores keep as it is; else ValueError naming `what`.

    A value either store would refuse must fail here, with its reason, before it reaches the database:
    there it would abort a whole import batch, or make a request's answer a 500.
    """
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    if limit is not None and len(value) > limit:
        raise ValueError(f"{what} is longer than {limit} characters")
    if "\x00" in value:
        raise ValueError(f"{what} holds a NUL character")  # PostgreSQL text cannot
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (a lone surrogate)") from None
    return value


def check_parameters(parameters):
    """InvalidValue ("invalid_parameter") for the first of the (name, value) request parameters that a
    store could not keep (a NUL, a lone surrogate), before any of them reaches a query."""
    for name, value in parameters:
        try:
            storable_text(value, f"the parameter {name}")
        except ValueError as error:
            raise InvalidValue("invalid_parameter", str(error)) from None


class StrictNumber(fields.Float):
    """A JSON number: marshmallow's Float would also take "1.5" and true."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictInteger(fields.Integer):
    """A JSON integer, as JSON Schema has it: 2 and 2.0, but not 2.5, "2" nor true."""

    def __init__(self, **kwargs):
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return super()._deserialize(value, attr, data, **kwargs)


class StrictBoolean(fields.Boolean):
    """JSON true or false only: marshmallow's Boolean would also take 1, "yes" and "on"."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


def error_lines(messages, path=""):
    """marshmallow's nested error messages as lines that name where each is: `terms[0].negation: …`."""
    if isinstance(messages, list):
        yield f"{path or 'query'}: {' '.join(str(message) for message in messages)}"
        return
    for key, value in messages.items():
        if key == "_schema":
            where = path
        elif isinstance(key, int):
            where = f"{path}[{key}]"
        else:
            where = f"{path}.{key}" if path else str(key)
        yield from error_lines(value, where)
