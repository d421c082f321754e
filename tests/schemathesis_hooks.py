"""Schemathesis hooks, which schemathesis.toml loads.

- Half the valid requests of the archive API name one of the demo's series (with its study, patient and
  project): names drawn one by one would hardly ever make a series that exists, and the calls would only ever
  answer "not found".
- Half the uploads carry a valid DICOM instance: random bytes are never a DICOM file, so without it every
  upload is refused and the calls linked from an upload's answer (get, list, download, results, forms,
  delete) never see an instance the fuzzer stored.
- A valid search's dates are in order and its {text} alone is no exclusion (no schema can say either), and a valid
  form's j is a query's JSON text (its contentSchema, which Schemathesis does not follow).
- A JSONP answer of the annotation API is 200 whatever happened: a script tag cannot read the status, so the
  error travels in the body (`NAME({"success": false, ...})`). The checks that judge an answer by its status
  alone take such an error for an acceptance; for them, its body's `success` is the status.
"""
import json
import zlib

import schemathesis
from hypothesis import strategies as st

from gateway.demo import DEMO_ARCHIVE, DEMO_CONTENT, demo_uid
from gateway.synthetic import make_instance

# A UID root of their own, so that what the fuzzer stores never meets the demo's UIDs by chance.
FUZZ_UID_ROOT = "1.2.826.0.1.3680043.8.498.7771"
# Schema-violating request accepted, wrong answer to an undeclared method: judged by the status alone.
STATUS_ONLY_CHECKS = {"ST201", "ST204"}


def _demo_series():
    """The demo's series as the archive API's parameters name them."""
    for project_index, (project, kind, patients) in enumerate(DEMO_CONTENT, start=1):
        for patient_number, (patient_id, _name, _sex, _birth_date, studies) in enumerate(patients, start=1):
            for study_number, _date, series_list in studies:
                for series_number, _modality, _description, count in series_list:
                    keys = (project_index, patient_number, study_number, series_number)
                    if kind == "retina":  # an instance is a series of its own, named by its SOPInstanceUID
                        uids = [demo_uid(*keys, number) for number in range(1, count + 1)]
                    else:
                        uids = [demo_uid(*keys)]
                    for series_uid in uids:
                        yield {"Project": project, "Archive": DEMO_ARCHIVE, "PatientID": patient_id,
                               "StudyInstanceUID": demo_uid(*keys[:3]), "SeriesInstanceUID": series_uid}


DEMO_SERIES = list(_demo_series())
# Queries that find some of the demo's reports.
DEMO_QUERIES = [
    {"terms": [{"q": "C0032285"}]},
    {"terms": [{"q": "C0205076", "negation": "Affirmed"}], "filter": {"start_date": "2017-01-01"},
     "returnFields": ["PatientID", "ContentDate"]},
    {"terms": [{"q": "pneumonia, chest wall"}], "filter": {"modalities": ["CR", "CT"]}},
]


def _valid(case):
    """Whether `case` was made as a valid request: an invalid one stays as invalid as it was made."""
    return case.meta is not None and case.meta.generation.mode == schemathesis.GenerationMode.POSITIVE


@schemathesis.hook("map_case").apply_to(path_regex=r"^/api/v1/")
def name_demo_series(_context, case):
    if not _valid(case):
        return case
    for values in (case.query, case.body):
        if isinstance(values, dict) and "PatientID" in values:
            # chosen by the generated values, so that a run still depends on its seed alone
            choice = zlib.crc32(repr(sorted(values.items(), key=str)).encode()) % (2 * len(DEMO_SERIES))
            if choice < len(DEMO_SERIES):
                values.update((name, value) for name, value in DEMO_SERIES[choice].items() if name in values)
    return case


@schemathesis.hook("map_case").apply_to(path_regex=r"^/api/search_")
def dates_in_order(_context, case):
    """A valid query's start_date is not after its end_date, which its schema cannot say."""
    if not _valid(case):
        return case
    for values in (case.body, case.query):
        if not isinstance(values, dict):
            continue
        _swap_dates_out_of_order(values)  # a JSON body
        query = values.get("j")
        if isinstance(query, str):  # the stateful phase has it as its JSON text
            try:
                query = json.loads(query)
            except ValueError:
                continue
            if _swap_dates_out_of_order(query):
                values["j"] = json.dumps(query)
        else:
            _swap_dates_out_of_order(query)
    return case


@schemathesis.hook("map_case").apply_to(path_regex=r"^/api/search_")
def not_only_exclusions(_context, case):
    """Without j, a valid search's {text} is its one term, which must not be an exclusion (a leading -): a
    query of exclusions alone is refused, which no schema of {text} can say (with j, {text} is not read)."""
    text, body = case.path_parameters.get("text"), case.body if isinstance(case.body, dict) else {}
    if case.media_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        has_query = "j" in body
    else:  # a JSON body is the query, unless it holds just the passphrase
        has_query = bool(set(body) - {"passphrase"})
    has_query = has_query or (isinstance(case.query, dict) and "j" in case.query)
    if _valid(case) and isinstance(text, str) and text.strip().startswith("-") and not has_query:
        case.path_parameters["text"] = text.strip().lstrip("-").strip() or DEMO_QUERIES[0]["terms"][0]["q"]
    return case


@schemathesis.hook("map_case").apply_to(path_regex=r"^/api/(?!v1/)")
def json_in_form_field_j(_context, case):
    """A valid form's field j is the JSON text of a query (its contentSchema), which Schemathesis does not
    make: it writes any text. Such a j becomes one of the demo's queries."""
    query = case.body.get("j") if _valid(case) and isinstance(case.body, dict) else None
    if isinstance(query, str) and not _json_object(query):
        case.body["j"] = json.dumps(DEMO_QUERIES[zlib.crc32(query.encode("utf-8", "replace")) % len(DEMO_QUERIES)])
    return case


def _json_object(text):
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _swap_dates_out_of_order(query):
    """Swap the filter dates of a query whose start_date is after its end_date; whether it did."""
    dates = query.get("filter") if isinstance(query, dict) else None
    start, end = (dates.get("start_date"), dates.get("end_date")) if isinstance(dates, dict) else (None, None)
    if isinstance(start, str) and isinstance(end, str) and start > end:
        dates["start_date"], dates["end_date"] = end, start
        return True
    return False


@st.composite
def _instances(draw):
    # A few patients and studies, so that uploads also meet an existing study (of another patient, too).
    patient, study, series, number = (draw(st.integers(1, bound)) for bound in (3, 4, 4, 10**9))
    study_uid = f"{FUZZ_UID_ROOT}.{study}"
    series_uid = f"{study_uid}.{series}"
    return make_instance(f"FUZZ-{patient}", study_uid, series_uid, f"{series_uid}.{number}")


@schemathesis.hook.apply_to(path_regex=r"/instance/upload/$")
def flatmap_body(_context, body):
    if not isinstance(body, dict) or "file" not in body:  # a negative case without the part: as generated
        return st.just(body)
    return st.one_of(st.just(body), _instances().map(lambda instance: {**body, "file": instance}))


@schemathesis.hook
def filter_failure(_context, failure, _case, response):
    return failure.code not in STATUS_ONLY_CHECKS or not _jsonp_error(response)


def _jsonp_error(response):
    """Whether `response` is a JSONP answer that wraps an error body."""
    if not response.headers.get("content-type", [""])[0].startswith("application/javascript"):
        return False
    _name, _, wrapped = response.text.partition("(")
    try:
        body = json.loads(wrapped.removesuffix(")"))
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("success") is False
