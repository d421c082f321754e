"""What both descriptions share: an apispec APISpec (OpenAPI 3.1) whose marshmallow plugin knows the
annotation query's own fields, and the pieces of content and answers both APIs use."""
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from apispec.ext.marshmallow.common import resolve_schema_cls

from ..annotations.dictionary import semantic_groups
from ..annotations.query import MAX_TEXT, _ManyOf, _OneOf, _OrUnset, _Query, _SemanticTypes, _TextList
from ..annotations.store import CUI_PATTERN
from . import answers

OPENAPI_VERSION = "3.1.0"
VERSION = "1"
BINARY = {"type": "string", "format": "binary"}
# Text without a NUL, which every parameter and query string of both APIs must be (gateway.validation)
NO_NUL = "^[^\\u0000]*$"
TEXT = {"type": "string", "pattern": NO_NUL}


def not_blank(also=""):
    """A pattern of text without a NUL that is not blank once stripped (Python's strip takes U+001C to U+001F
    and U+0085 too), nor made only of the characters `also`."""
    return f"^[^\\u0000]*[^\\s\\u001c-\\u001f\\u0085\\u0000{also}][^\\u0000]*$"


VALUES = not_blank(",")  # comma-separated values, not all blank
TERM = not_blank(",-")  # a term's q as text: its items, of which a lone `-` (it excludes nothing) is none
# What a field's validator checks, which the plugin cannot read from a function: by the field's name
_ITEM_PATTERNS = {"qstop": f"^{CUI_PATTERN.pattern}$"}
# What an _OrUnset field may also be given to leave its key unset, each tried on the field's own test.
_UNSET_CANDIDATES = ("", "Any", [])


def schema_name(schema):
    """The component name of a marshmallow schema: its class name without a leading _ or a Schema suffix."""
    name = resolve_schema_cls(schema).__name__.lstrip("_")
    return name.removesuffix("Schema") or name


def new_spec(title, description, security_schemes):
    plugin = MarshmallowPlugin(schema_name_resolver=schema_name)
    spec = APISpec(title=title, version=VERSION, openapi_version=OPENAPI_VERSION, plugins=[plugin],
                   info={"description": description})
    plugin.converter.add_attribute_function(query_field_properties)
    for name, scheme in security_schemes.items():
        spec.components.security_scheme(name, scheme)
    spec.components.schema("RequestLineError", schema=answers.RequestLineError)
    spec.components.response("Error414", {
        "description": "the request line is longer than the server reads (8,190 bytes, gunicorn answers it): send "
                       "a long query in the body",
        "content": json_content("RequestLineError"),
    })
    return spec


def query_field_properties(converter, field, ret, **kwargs):
    """The JSON schema of the fields that gateway.annotations.query defines itself (its StrictNumber and
    StrictBoolean are Float and Boolean to the plugin already)."""
    if isinstance(field, _OrUnset):
        unset = [{"const": value} for value in _UNSET_CANDIDATES if field.unset(value)]
        return {"anyOf": [converter.field2property(field.field), *unset]}
    if isinstance(field, _OneOf):
        return {"enum": list(field.choices.values())}
    if isinstance(field, _ManyOf):
        return _one_or_list({"type": "string", "enum": list(field.one.choices.values())}, field.max_items)
    if isinstance(field, _SemanticTypes):
        table = semantic_groups()
        words = {*table.type_of_tui, *table.type_of_tui.values(), *table.group_of_tui.values()}
        return _one_or_list({"type": "string", "enum": sorted(words),
                             "description": "a TUI, a semantic type's name or a semantic group (any case)"},
                            field.max_items)
    if isinstance(field, _TextList):
        pattern = _ITEM_PATTERNS.get(field.name)
        item = {"type": "string", "maxLength": MAX_TEXT, "pattern": pattern or not_blank()}
        text = {"type": "string", "pattern": VALUES, "description": "comma-separated values"}
        if pattern:  # the same items, comma-separated
            bare = pattern.strip("^$")
            text["pattern"] = f"^\\s*{bare}\\s*(,\\s*{bare}\\s*)*$"
        return {"anyOf": [text, {"type": "array", "items": item, "minItems": 1, "maxItems": field.max_items}]}
    if isinstance(field, _Query):
        text = {"type": "string", "pattern": TERM, "description": "comma-separated items; a leading - excludes what "
                "the term matches (and one before an item what that item matches)"}
        item = {"type": "string", "maxLength": MAX_TEXT, "pattern": not_blank("-")}
        return {"anyOf": [text, {"type": "array", "items": item, "minItems": 1, "maxItems": _TextList().max_items}]}
    return {}


def _one_or_list(one, max_items):
    return {"anyOf": [one, {"type": "array", "items": one, "minItems": 1, "maxItems": max_items}]}


def json_content(schema):
    return {"application/json": {"schema": schema}}


def one_of(schemas):
    """The schema of an answer that is one of `schemas` (marshmallow schemas, resolved by the plugin)."""
    return schemas[0] if len(schemas) == 1 else {"oneOf": list(schemas)}


def retry_after_header():
    return {"Retry-After": {"description": "seconds until the client may try again", "schema": {"type": "integer"}}}
