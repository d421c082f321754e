"""The JSON answers of both APIs as marshmallow schemas, exactly as the calls send them: every key that an
answer always has is required, none other is allowed, and a value that can be null says so.

They describe (gateway.archive, results, forms, annotations.store and annotations.api) and are read only by
the OpenAPI descriptions; nothing loads an answer through them.
"""
from marshmallow import Schema, fields, validate

from ..annotations.store import METADATA_COLUMNS
from ..models import SERIES_STATUSES

SEARCH_ROW = "SearchRow"  # the component name of a search result with several returnFields


def _text(**options):
    return fields.String(required=True, **options)


def _nullable_text(**options):
    return fields.String(required=True, allow_none=True, **options)


def _constant(value):
    return fields.Boolean(required=True, validate=validate.OneOf([value]))


class RequestLineError(Schema):
    """What the server answers itself for a request line it will not read (gateway.server): the fields of
    both APIs' error bodies at once, since which API was meant is not known yet."""

    success = _constant(False)
    error_type = _text()
    suberror_type = _text()
    message = _text()


# --- archive API v1 ---------------------------------------------------------------------------------------


class V1Error(Schema):
    error_type = _text(metadata={"description": "what went wrong, e.g. object_not_found, invalid_get_value"})
    suberror_type = _nullable_text(metadata={"description": "the detail, e.g. patient_not_found; null if none"})
    message = _text()


class Uploaded(Schema):
    PatientID = _text()
    StudyInstanceUID = _text()
    SeriesInstanceUID = _text()
    SOPInstanceUID = _text()


class Patient(Schema):
    PatientID = _text()
    PatientName = _nullable_text()
    PatientSex = _nullable_text()
    PatientBirthDate = fields.Date(required=True, allow_none=True)


class Study(Schema):
    StudyInstanceUID = _text()
    StudyDate = fields.Date(required=True, allow_none=True)
    StudyTime = _nullable_text(metadata={"description": "HH:MM:SS, any fraction kept"})
    StudyDescription = _nullable_text()
    ReferringPhysicianName = _nullable_text()
    InstitutionName = _nullable_text()
    AccessionNumber = _nullable_text()


class Series(Schema):
    SeriesInstanceUID = _text()
    SOPClassUID = _nullable_text()
    SeriesDate = fields.Date(required=True, allow_none=True)
    SeriesTime = _nullable_text()
    SeriesDescription = _nullable_text()
    Manufacturer = _nullable_text()
    ManufacturerModelName = _nullable_text()
    status = _text(validate=validate.OneOf(SERIES_STATUSES))
    status_message = _nullable_text()


class Deleted(Schema):
    status = _text(validate=validate.OneOf(["Ok"]))


class ScalarResult(Schema):
    name = _text()
    algorithm = _text()
    # typed on the way in (gateway.results.typed_value): an integer, a decimal, else the text as sent
    value = fields.Raw(required=True, metadata={"type": ["number", "string"]})


class FileResult(Schema):
    name = _text()
    algorithm = _text()
    file = _text(metadata={"description": "the stored file name"})


class FormSubmission(Schema):
    id = fields.Integer(required=True)
    entry = fields.Dict(required=True, metadata={"description": "the submission as checked against the form"})
    entry_formatted = _text(metadata={"description": "the entry as `Label: value` lines"})
    user = _text(metadata={"description": "the submitter's email"})
    series = _text(metadata={"description": "the SeriesInstanceUID"})
    form = _text(metadata={"description": "the form's name"})


# --- annotation API ---------------------------------------------------------------------------------------


class AnnotationError(Schema):
    success = _constant(False)
    message = _text()


class _Answer(Schema):
    success = _constant(True)
    transactionId = fields.UUID(required=True)
    num_results = fields.Integer(required=True, validate=validate.Range(min=0))


class DocumentPage(_Answer):
    results = fields.List(fields.String(), required=True, metadata={"description": "SOPInstanceUIDs"})


class SearchResults(_Answer):
    warnings = fields.List(fields.String(), metadata={"description": "codes not in the dictionary and the like"})
    results = fields.List(
        fields.Raw(metadata={"anyOf": [{"type": ["string", "null"]}, {"$ref": f"#/components/schemas/{SEARCH_ROW}"}]}),
        required=True,
        metadata={"description": "with one returnField its values, with several an object of them per document"},
    )


# the metadata keys of a document: the returnFields of a search, and the head of doc_detail's anns
SearchRow = Schema.from_dict({keyword: fields.String(allow_none=True) for keyword in METADATA_COLUMNS}, name=SEARCH_ROW)
_DOCUMENT_METADATA = {
    keyword: _text() if keyword == "SOPInstanceUID" else _nullable_text() for keyword in METADATA_COLUMNS
}


class Annotation(Schema):
    start = fields.Integer(required=True, allow_none=True)
    end = fields.Integer(required=True, allow_none=True)
    str = _nullable_text()
    cui = _text()
    pref = _nullable_text()
    sty = _nullable_text()
    negation = _nullable_text()
    experiencer = _nullable_text()
    temporality = _nullable_text()


class MappedAnnotation(Annotation):
    mapped = _text(metadata={"description": "the mapping's term that lists this annotation's CUI"})


class Annotations(Schema.from_dict(_DOCUMENT_METADATA)):
    annotations = fields.List(fields.Nested(Annotation), required=True)
    phenotypes = fields.List(fields.Raw(), required=True)
    sentences = fields.List(fields.Raw(), required=True)


class MappedAnnotations(Annotations):
    annotations = fields.List(fields.Nested(MappedAnnotation), required=True)
    mapping_name = _text()


class DocumentDetail(Schema):
    anns = fields.Nested(Annotations, required=True)
    content = _nullable_text(metadata={"description": "the report text"})


class MappedDocumentDetail(Schema):
    anns = fields.Nested(MappedAnnotations, required=True)
    content = _nullable_text()
