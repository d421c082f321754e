"""POST /api/v1/instance/upload/ through the Flask test client.

Every test checks what the client is told (status and the JSON error body) and what the gateway
kept: rows in the database and files in the storage folder. Every upload made through `upload()`
also checks that no spooled temp file (`tmp/*.part`) outlives its request.
"""
import errno
import filecmp
import io
import logging
import os
import re
import struct
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import OperationalError
from urllib3 import encode_multipart_formdata
from urllib3.fields import RequestField

from gateway import dicom_ingest
from gateway.auth import API_PERMISSIONS
from gateway.auth.users import create_user, grant
from gateway.db import db, write_engine
from gateway.models import instances, patients, series, studies
from gateway.projects import add_member
from gateway.storage import FileStorage
from gateway.synthetic import CT_IMAGE_STORAGE, make_instance

from .conftest import PASSWORD, assert_error, credentials, instance

UPLOAD_URL = "/api/v1/instance/upload/"
IDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# The only names the storage may hold outside tmp/: keys it generated itself.
STORAGE_KEY = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{32}\.dcm$")
CLEAN_FILENAME = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
PYDICOM_TEST_FILES = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")


# --- helpers ------------------------------------------------------------------------------------------------


def storage_root(app):
    return Path(app.config["STORAGE_DIR"])


def temp_files(app):
    return sorted(path.name for path in (storage_root(app) / "tmp").iterdir())


def stored_keys(app):
    """Every file in the storage folder outside tmp/, as a path relative to the storage root."""
    root = storage_root(app)
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and path.relative_to(root).parts[0] != "tmp"
    )


def row_counts(app):
    with app.app_context():
        return {
            table.name: db.session.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (patients, studies, series, instances)
        }


def instance_rows(app):
    with app.app_context():
        return db.session.execute(
            select(instances.c.sop_instance_uid, instances.c.filename, instances.c.storage_key, instances.c.size_bytes)
        ).all()


NOTHING = {"patients": 0, "studies": 0, "series": 0, "instances": 0}


def assert_nothing_stored(app):
    assert row_counts(app) == NOTHING
    assert stored_keys(app) == []
    assert temp_files(app) == []


def upload(api, data, **options):
    """api.upload, plus the check that the request left no temp file behind, whatever its answer."""
    response = api.upload(data, **options)
    leftovers = temp_files(api.client.application)
    assert leftovers == [], f"temp files left by an upload answered {response.status_code}: {leftovers}"
    return response


def error_triple(response):
    body = response.get_json()
    return response.status_code, body["error_type"], body["suberror_type"]


def ids_of(data):
    dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return {keyword: str(dataset[keyword].value) for keyword in IDS}


def dicom_bytes(dataset):
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def series_files(api, ids, project="alpha", archive="main"):
    """The series' zip from /dicom/get/ as {entry name: bytes}."""
    response = api.get(
        "dicom/get/",
        Project=project,
        Archive=archive,
        PatientID=ids["PatientID"],
        StudyInstanceUID=ids["StudyInstanceUID"],
        SeriesInstanceUID=ids["SeriesInstanceUID"],
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.get_data())) as archive_zip:
        return {name: archive_zip.read(name) for name in archive_zip.namelist()}


def patient_status(api, patient_id, project="alpha", archive="main"):
    return api.get("patient/get/", Project=project, Archive=archive, PatientID=patient_id).status_code


# --- success ------------------------------------------------------------------------------------------------


def test_upload_answers_the_four_identifiers_and_stores_the_file_once(api, seeded):
    data = instance(1)
    response = upload(api, data, filename="chest.dcm")

    assert response.status_code == 200
    assert response.get_json() == {
        "PatientID": "PAT-1",
        "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.99.1.1",
        "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.99.1.1.1",
        "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.99.1.1.1.1",
    }
    assert row_counts(seeded) == {"patients": 1, "studies": 1, "series": 1, "instances": 1}
    keys = stored_keys(seeded)
    assert len(keys) == 1 and STORAGE_KEY.match(keys[0])
    assert (storage_root(seeded) / keys[0]).read_bytes() == data
    [row] = instance_rows(seeded)
    assert (row.filename, row.storage_key, row.size_bytes) == ("chest.dcm", keys[0], len(data))
    # What comes back out is byte for byte what went in.
    assert series_files(api, response.get_json()) == {"1.2.826.0.1.3680043.8.498.99.1.1.1.1.dcm": data}


def test_instance_with_an_undefined_length_sequence_is_stored(api, seeded):
    # Undefined-length sequences are everyday DICOM (most modalities write them); the file is complete
    # and carries all four identifiers, so it must be stored like any other.
    dataset = pydicom.dcmread(io.BytesIO(instance(1)))
    item = Dataset()
    item.CodeValue = "T-D3000"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "Chest"
    dataset.AnatomicRegionSequence = Sequence([item])
    dataset["AnatomicRegionSequence"].is_undefined_length = True
    data = dicom_bytes(dataset)
    assert b"\xfe\xff\xdd\xe0" in data  # the sequence delimitation item: the encoding under test is really there

    response = upload(api, data)

    assert response.status_code == 200, response.get_json()
    assert response.get_json() == ids_of(data)
    assert row_counts(seeded)["instances"] == 1
    assert series_files(api, response.get_json()) == {f"{dataset.SOPInstanceUID}.dcm": data}


@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # a quirk of one corpus file, reported by pydicom
def test_pydicom_test_files_are_each_stored_or_refused_cleanly(api, seeded):
    """Every file of pydicom's own test folder (the DICOMDIR tree and the non-DICOM files too), uploaded
    in sorted order into one archive: never a 500."""
    root = Path(PYDICOM_TEST_FILES)
    paths = sorted(path for path in root.rglob("*") if path.is_file())
    if not any(path.suffix == ".dcm" for path in paths):
        pytest.skip("the installed pydicom ships no test files")
    first_bytes = {}  # SOPInstanceUID -> bytes of the file stored under it
    study_patient = {}
    series_study = {}
    outcome = {}
    for path in paths:
        name = path.relative_to(root).as_posix()
        data = path.read_bytes()
        response = upload(api, data, filename=path.name)
        outcome[name] = response.status_code
        if response.status_code == 200:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
            expected = {keyword: str(dataset[keyword].value) for keyword in IDS}
            assert response.get_json() == expected, name
            sop, study, series_uid = (expected[k] for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"))
            # A 200 under an already stored SOPInstanceUID is only right for the very same bytes.
            assert first_bytes.setdefault(sop, data) == data, f"{name} replaced or shadowed another file"
            study_patient.setdefault(study, expected["PatientID"])
            series_study.setdefault(series_uid, study)
        elif response.status_code == 409:
            assert_error(response, 409, "invalid_post_value", "conflicting_instance")
            # The conflict must be real: other bytes under a stored SOPInstanceUID, or a stored study
            # or series tied to another patient or study.
            ids = ids_of(data)
            sop, study, series_uid = ids["SOPInstanceUID"], ids["StudyInstanceUID"], ids["SeriesInstanceUID"]
            assert (
                (sop in first_bytes and first_bytes[sop] != data)
                or study_patient.get(study, ids["PatientID"]) != ids["PatientID"]
                or series_study.get(series_uid, study) != study
            ), f"{name}: 409 without a conflicting stored object"
        else:
            assert_error(response, 400, "invalid_post_value", "invalid_dicom")

    # Anchors from the corpus (checked where the installed pydicom has them): files that are plainly
    # good, plainly broken, or a re-encoding of a stored instance.
    anchors = {
        "CT_small.dcm": 200,
        "MR_small.dcm": 200,
        "MR_small_implicit.dcm": 409,  # MR_small.dcm in another transfer syntax: same UID, other bytes
        "MR_small_bigendian.dcm": 409,
        "MR_truncated.dcm": 400,
        "rtplan_truncated.dcm": 400,
        "no_meta.dcm": 400,
        "ExplVR_LitEndNoMeta.dcm": 400,
    }
    assert {name: outcome[name] for name in anchors if name in outcome} == {
        name: status for name, status in anchors.items() if name in outcome
    }
    # Exactly the accepted files are stored, each once and unchanged by the refused ones.
    rows = instance_rows(seeded)
    assert sorted(row.sop_instance_uid for row in rows) == sorted(first_bytes)
    assert sorted(row.storage_key for row in rows) == stored_keys(seeded)
    for row in rows:
        assert (storage_root(seeded) / row.storage_key).read_bytes() == first_bytes[row.sop_instance_uid]


# --- refusals that store nothing ----------------------------------------------------------------------------


def test_zero_byte_file_is_refused(api, seeded):
    response = upload(api, b"")
    assert_error(response, 400, "invalid_post_value", "no_data_submitted")
    assert_nothing_stored(seeded)


def test_missing_file_field_is_refused(api, seeded):
    response = api.client.post(
        UPLOAD_URL, data={"Project": "alpha", "Archive": "main", "other": (io.BytesIO(instance(1)), "a.dcm")},
        headers=api.headers,
    )
    assert_error(response, 400, "invalid_post_value", "no_data_submitted")
    assert_nothing_stored(seeded)
    # a missing file is a parameter error, which comes before an unknown project
    response = api.post("instance/upload/", {"Project": "no-such-project", "Archive": "main"})
    assert_error(response, 400, "invalid_post_value", "no_data_submitted")


def test_text_file_is_refused(api, seeded):
    response = upload(api, b"PatientID: PAT-1\nthis is a report, not an image\n" * 20, filename="report.txt")
    assert_error(response, 400, "invalid_post_value", "invalid_dicom")
    assert_nothing_stored(seeded)


def test_instance_without_an_identifier_is_refused(api, seeded):
    # One loop rather than eight parametrised tests: each case starts from nothing stored anyway.
    for keyword in IDS:
        for how in ("deleted", "blank"):
            dataset = pydicom.dcmread(io.BytesIO(instance(1)))
            if how == "deleted":
                del dataset[keyword]
            else:
                setattr(dataset, keyword, "")
            data = dicom_bytes(dataset)
            assert pydicom.dcmread(io.BytesIO(data)).get(keyword) in (None, "")  # still DICOM, only the id is gone

            response = upload(api, data)

            assert response.status_code == 400, (keyword, how)
            assert_error(response, 400, "invalid_post_value", "invalid_dicom")
            assert keyword in response.get_json()["message"]
            assert_nothing_stored(seeded)


_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _element_ends(data):
    """{tag: end offset} of each top-level element of an explicit VR little endian Part 10 file.

    Written here from the encoding rules (not with the gateway's pydicom walk) so that it is an
    independent oracle for where a cut is an element boundary.
    """
    assert data[128:132] == b"DICM"
    offset, ends = 132, {}
    while offset < len(data):
        group, element = struct.unpack_from("<HH", data, offset)
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_LENGTH_VRS:
            (length,) = struct.unpack_from("<I", data, offset + 8)
            header = 12
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            header = 8
        assert length != 0xFFFFFFFF
        offset += header + length
        ends[(group << 16) | element] = offset
    assert offset == len(data)
    return ends


def test_truncated_instance_is_refused_unless_cut_on_an_element_boundary(api, seeded):
    data = instance(1)
    ends = _element_ends(data)
    boundaries = set(ends.values())
    ids_end = max(ends[tag] for tag in (0x00100020, 0x0020000D, 0x0020000E, 0x00080018))
    pixel_end = ends[0x7FE00010]
    pixel_start = pixel_end - 64 * 64 * 2
    cuts = set(range(97, len(data), 97)) | {cut for cut in boundaries if cut < len(data)}
    # Inside the pixel data element: its header, its first and last bytes, its middle.
    cuts |= {pixel_start - 6, pixel_start - 1, pixel_start, pixel_start + 1, (pixel_start + pixel_end) // 2}
    cuts.add(pixel_end - 1)
    complete = ids_of(data)
    accepted = 0
    for cut in sorted(cuts):
        response = upload(api, data[:cut])
        if cut in boundaries and cut >= ids_end:
            # Ending on an element boundary after the identifiers is a shorter but valid instance.
            assert response.status_code == 200, (cut, response.get_json())
            assert response.get_json() == complete
            accepted += 1
            assert patient_status(api, "PAT-1") == 200
            deleted = api.get("patient/delete/", Project="alpha", Archive="main", PatientID="PAT-1")
            assert deleted.status_code == 200  # so the next valid cut is not a conflict
        else:
            assert response.status_code == 400, (cut, cut in boundaries, response.get_json())
            assert_error(response, 400, "invalid_post_value", "invalid_dicom")
            assert row_counts(seeded) == NOTHING, cut
            assert stored_keys(seeded) == [], cut
    assert accepted >= 2  # the boundary cuts after the identifiers really were exercised
    assert_nothing_stored(seeded)


def test_file_without_part10_preamble_is_refused(api, seeded):
    data = instance(1)
    candidates = {"no preamble": data[128:], "no preamble nor DICM": data[132:]}
    no_meta = os.path.join(PYDICOM_TEST_FILES, "no_meta.dcm")
    if os.path.exists(no_meta):
        with open(no_meta, "rb") as handle:
            candidates["pydicom no_meta.dcm"] = handle.read()
    for label, candidate in candidates.items():
        response = upload(api, candidate)
        assert response.status_code == 400, label
        assert_error(response, 400, "invalid_post_value", "invalid_dicom")
    assert_nothing_stored(seeded)


_UID_64 = "1.2.826.0.1.3680043.8.498." + "1" * 38
assert len(_UID_64) == 64


@pytest.mark.filterwarnings("ignore:The value length")  # pydicom warns when writing the over-long value
@pytest.mark.parametrize("keyword", IDS)
def test_identifier_longer_than_64_characters_is_refused(api, seeded, keyword):
    uids = ids_of(instance(1))
    uids[keyword] = _UID_64 + "1"
    response = upload(api, make_instance(*(uids[k] for k in IDS)))
    assert_error(response, 400, "invalid_post_value", "invalid_dicom")
    assert_nothing_stored(seeded)

    # 64 characters is the limit itself and is fine (on PostgreSQL too, whose columns are 64 wide).
    uids[keyword] = _UID_64
    response = upload(api, make_instance(*(uids[k] for k in IDS)))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()[keyword] == _UID_64


@pytest.mark.parametrize("keyword", IDS)
def test_identifier_with_a_nul_inside_is_refused(api, seeded, keyword):
    """Stripping the NUL would store another UID than the file's; trailing NUL padding is fine."""
    uids = ids_of(instance(1))
    padded = dict(uids, **{keyword: uids[keyword] + "\x00"})
    assert upload(api, make_instance(*(padded[k] for k in IDS))).status_code == 200
    uids[keyword] = uids[keyword][:3] + "\x00" + uids[keyword][3:]
    response = upload(api, make_instance(*(uids[k] for k in IDS)))
    assert_error(response, 400, "invalid_post_value", "invalid_dicom")
    assert "NUL" in response.get_json()["message"]


UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
NOT_UIDS = ["../../../../tmp/x", "/etc/passwd", "..\\..\\x", "1..2", ".1.2", "1.2.", "1.2.3a", "1.2 .3",
            "1.2\\1.3", "1.2.\xb3"]


@pytest.mark.parametrize("keyword", UIDS)
def test_a_uid_that_is_not_digits_and_dots_is_refused(api, seeded, keyword):
    """The UI value representation: zip entries are named after UIDs, so `../` must never get in."""
    for value in NOT_UIDS:
        uids = {**ids_of(instance(1)), "SOPClassUID": CT_IMAGE_STORAGE, keyword: value}
        response = upload(api, make_instance(*(uids[name] for name in IDS), sop_class_uid=uids["SOPClassUID"]))
        assert_error(response, 400, "invalid_post_value", "invalid_dicom")
        assert keyword in response.get_json()["message"], value
        assert_nothing_stored(seeded)


def test_patient_id_is_no_uid_and_sop_class_uid_may_be_absent(api, seeded):
    uids = {**ids_of(instance(1)), "PatientID": "../PAT 1/x"}  # an LO: any text but a backslash
    assert upload(api, make_instance(*(uids[keyword] for keyword in IDS))).get_json() == uids
    dataset = pydicom.dcmread(io.BytesIO(instance(1, patient="PAT-2")))
    del dataset.SOPClassUID
    assert upload(api, dicom_bytes(dataset)).status_code == 200


def _element(group, element, vr, value):
    """An explicit VR little endian element of a VR with a 2-byte length."""
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _nested_sequences(depth):
    """An undefined-length sequence of one item, nested `depth` deep and left open (the file ends first)."""
    sequence = struct.pack("<HH2sHI", 0x7FE1, 0x0010, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    return (sequence + item) * depth


def _with_charset_element(data, element):
    """The file with `element` as its (0008,0005), which goes just before SOPClassUID (0008,0016)."""
    at = data.index(struct.pack("<HH2s", 0x0008, 0x0016, b"UI"))
    return data[:at] + element + data[at:]


def _deflated(data):
    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    return dicom_bytes(dataset)


def _cut_inside_the_pixel_data_header(data):
    return data[: data.index(struct.pack("<HH2s", 0x7FE0, 0x0010, b"OW")) + 9]


def _odd_group_length(data):
    """(0002,0000), a UL, given 3 bytes: it is the first element after the preamble and 'DICM'."""
    assert data[132:140] == struct.pack("<HH2sH", 0x0002, 0x0000, b"UL", 4)
    return data[:132] + _element(0x0002, 0x0000, b"UL", data[140:143]) + data[144:]


# Each a file that makes pydicom raise one of the errors read_instance takes for malformed input.
MALFORMED = {
    "pydicom.errors.InvalidDicomError": lambda data: data[128:],  # no preamble
    "builtins.OSError": lambda data: data + _nested_sequences(1),
    "builtins.RecursionError": lambda data: data + _nested_sequences(5000),
    "builtins.TypeError": lambda data: _with_charset_element(data, _element(0x0008, 0x0005, b"PN", b"ISO_IR 100")),
    "builtins.ValueError": lambda data: _with_charset_element(data, _element(0x0008, 0x0005, b"CS", b"ISO_IR\x00100")),
    "builtins.NotImplementedError": lambda data: data.replace(b"\x02\x00\x10\x00UI", b"\x02\x00\x10\x00QQ"),
    "pydicom.errors.BytesLengthException": _odd_group_length,
    "zlib.error": lambda data: _deflated(data)[:-9],  # the end of the deflate stream
    "struct.error": _cut_inside_the_pixel_data_header,
}


@pytest.mark.parametrize("raised", sorted(MALFORMED))
def test_what_pydicom_raises_on_malformed_input_is_a_400(api, seeded, raised, tmp_path):
    data = MALFORMED[raised](instance(1))
    path = tmp_path / "malformed.dcm"
    path.write_bytes(data)
    with open(path, "rb") as handle, pytest.raises(dicom_ingest.InvalidDicom) as refused:
        dicom_ingest.read_instance(handle, len(data))
    cause = refused.value.__context__
    assert f"{type(cause).__module__}.{type(cause).__name__}" == raised  # the file really makes pydicom raise it
    assert_error(upload(api, data), 400, "invalid_post_value", "invalid_dicom")
    assert_nothing_stored(seeded)


def test_a_time_with_other_digits_than_ascii_is_no_time(api, seeded):
    dataset = pydicom.dcmread(io.BytesIO(instance(1)))
    dataset.SpecificCharacterSet = "ISO_IR 100"
    data = dicom_bytes(dataset).replace(b"101500", b"10\xb3500")  # "10³500": str.isdigit() takes "³"
    response = upload(api, data)
    assert response.status_code == 200, response.get_json()
    study = api.get("study/get/", Project="alpha", Archive="main", PatientID="PAT-1",
                    StudyInstanceUID=ids_of(data)["StudyInstanceUID"])
    assert study.get_json()["StudyTime"] is None


def test_upload_larger_than_the_limit_is_refused(api, seeded):
    data = make_instance("PAT-1", "1.2.3.1", "1.2.3.1.1", "1.2.3.1.1.1", rows=1500, columns=1500)
    assert len(data) > 4 * 1024 * 1024  # the app fixture's MAX_UPLOAD_MB
    response = upload(api, data)
    assert_error(response, 413, "invalid_post_value", "file_too_large")
    assert_nothing_stored(seeded)


# --- idempotency and conflicts ------------------------------------------------------------------------------


def test_same_bytes_twice_is_one_instance(api, seeded):
    data = instance(1)
    first = upload(api, data)
    second = upload(api, data)
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.get_json() == second.get_json() == ids_of(data)
    assert row_counts(seeded) == {"patients": 1, "studies": 1, "series": 1, "instances": 1}
    assert len(stored_keys(seeded)) == 1
    assert series_files(api, first.get_json()) == {f"{ids_of(data)['SOPInstanceUID']}.dcm": data}


def test_other_bytes_under_a_stored_sop_instance_uid_are_refused(api, seeded):
    original = instance(1)
    assert upload(api, original).status_code == 200
    [key] = stored_keys(seeded)
    rival = instance(1, pixel_seed=7)  # same four UIDs, other pixels
    assert rival != original and len(rival) == len(original)  # same size: only the bytes differ

    response = upload(api, rival)

    assert_error(response, 409, "invalid_post_value", "conflicting_instance")
    assert stored_keys(seeded) == [key]
    assert (storage_root(seeded) / key).read_bytes() == original
    assert row_counts(seeded)["instances"] == 1
    assert series_files(api, ids_of(original)) == {f"{ids_of(original)['SOPInstanceUID']}.dcm": original}


def test_study_of_another_patient_is_refused(api, seeded):
    assert upload(api, make_instance("PAT-A", "1.2.3.1", "1.2.3.1.1", "1.2.3.1.1.1")).status_code == 200
    before = (row_counts(seeded), stored_keys(seeded))

    response = upload(api, make_instance("PAT-B", "1.2.3.1", "1.2.3.1.2", "1.2.3.1.2.1"))

    assert_error(response, 409, "invalid_post_value", "conflicting_instance")
    assert (row_counts(seeded), stored_keys(seeded)) == before
    assert patient_status(api, "PAT-B") == 404  # the patient row made on the way was rolled back


def test_series_of_another_study_is_refused(api, seeded):
    assert upload(api, make_instance("PAT-A", "1.2.3.1", "1.2.3.1.1", "1.2.3.1.1.1")).status_code == 200
    before = (row_counts(seeded), stored_keys(seeded))

    response = upload(api, make_instance("PAT-A", "1.2.3.2", "1.2.3.1.1", "1.2.3.2.1.1"))

    assert_error(response, 409, "invalid_post_value", "conflicting_instance")
    assert (row_counts(seeded), stored_keys(seeded)) == before
    study = api.get("study/get/", Project="alpha", Archive="main", PatientID="PAT-A", StudyInstanceUID="1.2.3.2")
    assert_error(study, 404, "object_not_found", "study_not_found")


def test_same_instance_in_another_archive_is_another_object(api, seeded):
    data = instance(1)
    assert upload(api, data).status_code == 200
    assert upload(api, data, archive="second").status_code == 200
    assert row_counts(seeded) == {"patients": 2, "studies": 2, "series": 2, "instances": 2}
    assert len(stored_keys(seeded)) == 2


# --- filenames ----------------------------------------------------------------------------------------------


HOSTILE_FILENAMES = [
    "../../etc/passwd",
    "/etc/passwd",
    "..\\..\\win.ini",
    "C:\\Windows\\System32\\evil.dcm",
    "~/.bashrc",
    "..",
    "résumé scan (1).dcm",
    "  ünïcødé 文件 名 .dcm ",
    "\u202egpj.dcm",  # right-to-left override
    "x" * 300 + ".dcm",
]


def test_client_filenames_never_decide_where_files_land(api, seeded, tmp_path, monkeypatch):
    # A working directory nested in tmp_path: a relative path from the client resolved against it
    # (or against the storage folder) would land somewhere in tmp_path, where the tree check sees it.
    cwd = tmp_path / "cwd" / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    passwd = os.stat("/etc/passwd") if os.path.exists("/etc/passwd") else None

    sop_by_name = {}
    for number, name in enumerate(["clean_name-1.dcm", *HOSTILE_FILENAMES], start=1):
        response = upload(api, instance(number), filename=name)
        assert response.status_code == 200, (name, response.get_json())
        sop_by_name[name] = response.get_json()["SOPInstanceUID"]

    keys = stored_keys(seeded)
    assert len(keys) == len(sop_by_name)
    assert [key for key in keys if not STORAGE_KEY.match(key)] == []
    # Outside the storage folder: only the SQLite files (on PostgreSQL, nothing at all).
    others = sorted(
        path.relative_to(tmp_path).as_posix()
        for path in tmp_path.rglob("*")
        if path.is_file() and storage_root(seeded) not in path.parents
    )
    assert [name for name in others if not name.startswith("gateway.sqlite")] == []
    if passwd is not None:
        after = os.stat("/etc/passwd")
        assert (after.st_size, after.st_mtime_ns) == (passwd.st_size, passwd.st_mtime_ns)

    filenames = {row.sop_instance_uid: row.filename for row in instance_rows(seeded)}
    assert filenames[sop_by_name["clean_name-1.dcm"]] == "clean_name-1.dcm"  # a clean name is kept as it is
    for name, sop in sop_by_name.items():
        stored = filenames[sop]
        assert CLEAN_FILENAME.match(stored), (name, stored)
        assert "/" not in stored and "\\" not in stored and ".." not in stored, (name, stored)
        assert not stored.startswith("."), (name, stored)


# What rows that older code stored may hold, and names that only differ in case or in what is left out.
HOSTILE_STORED_UIDS = ["../../../../tmp/x", "/etc/passwd", "..\\..\\evil", "tmp_x", "TMP_X", "..", ""]


def test_zip_entry_names_are_safe_whatever_uids_are_stored(api, seeded):
    files = [instance(number) for number in range(1, len(HOSTILE_STORED_UIDS) + 2)]
    for data in files:
        assert upload(api, data).status_code == 200
    with seeded.app_context(), write_engine().begin() as connection:
        for data, hostile in zip(files, HOSTILE_STORED_UIDS):  # the last file keeps its own UID
            connection.execute(
                update(instances)
                .where(instances.c.sop_instance_uid == ids_of(data)["SOPInstanceUID"])
                .values(sop_instance_uid=hostile)
            )
    response = api.get("dicom/get/", Project="alpha", Archive="main",
                       **{keyword: ids_of(files[0])[keyword] for keyword in IDS[:3]})
    assert response.status_code == 200
    with zipfile.ZipFile(io.BytesIO(response.get_data())) as archive_zip:
        names = archive_zip.namelist()
        contents = [archive_zip.read(name) for name in names]
    for name in names:
        assert CLEAN_FILENAME.match(name) and not name.startswith("."), name  # no folder, `..`, `\\` or leading /
    assert len({name.casefold() for name in names}) == len(names) == len(files)  # none unpacks over another
    assert sorted(contents) == sorted(files)
    assert f"{ids_of(files[-1])['SOPInstanceUID']}.dcm" in names  # a UID names its entry as it is


# --- retina projects ----------------------------------------------------------------------------------------


def test_retina_series_is_the_sop_instance(api, seeded):
    # Two images of one acquisition series: in a retina project each is its own series.
    first, second = instance(1), instance(2)
    answers = [upload(api, data, project="eyes") for data in (first, second)]
    assert [answer.status_code for answer in answers] == [200, 200]
    study_uid = ids_of(first)["StudyInstanceUID"]
    for data, answer in zip((first, second), answers):
        sop = ids_of(data)["SOPInstanceUID"]
        assert answer.get_json() == {**ids_of(data), "SeriesInstanceUID": sop}
        found = api.get(
            "series/get/", Project="eyes", Archive="main", PatientID="PAT-1", StudyInstanceUID=study_uid,
            SeriesInstanceUID=sop,
        )
        assert found.status_code == 200
        assert found.get_json()["SeriesInstanceUID"] == sop
        assert series_files(api, answer.get_json(), project="eyes") == {f"{sop}.dcm": data}
    listed = api.get(
        "patient/study/series/list/", Project="eyes", Archive="main", PatientID="PAT-1", StudyInstanceUID=study_uid
    )
    assert sorted(item["SeriesInstanceUID"] for item in listed.get_json()) == sorted(
        ids_of(data)["SOPInstanceUID"] for data in (first, second)
    )
    # The file's own SeriesInstanceUID names no series there.
    original = api.get(
        "series/get/", Project="eyes", Archive="main", PatientID="PAT-1", StudyInstanceUID=study_uid,
        SeriesInstanceUID=ids_of(first)["SeriesInstanceUID"],
    )
    assert_error(original, 404, "object_not_found", "series_not_found")
    # And the same bytes again are still idempotent there.
    assert upload(api, first, project="eyes").get_json() == answers[0].get_json()
    assert row_counts(seeded)["instances"] == 2


# --- permissions --------------------------------------------------------------------------------------------


def test_upload_needs_credentials(api, seeded):
    cases = {
        "none": {},
        "no password": {"X-USERNAME": "alice"},
        "wrong password": credentials("alice", "wrong password"),
        "unknown user": credentials("nobody"),
    }
    for label, headers in cases.items():
        response = api.client.post(
            UPLOAD_URL, data={"Project": "alpha", "Archive": "main", "file": (io.BytesIO(instance(1)), "a.dcm")},
            headers=headers,
        )
        assert response.status_code == 401, label
        assert_error(response, 401, "not_authenticated", None)
        assert_nothing_stored(seeded)


def test_credentials_and_permission_come_before_a_large_body_is_read(api, seeded, monkeypatch):
    """A stranger's large upload is never spooled, and a wrong password is a 401 even for an oversized body."""
    spooled = []
    monkeypatch.setattr(FileStorage, "temp_file", lambda storage: spooled.append(1))
    with seeded.app_context():
        create_user("frank", "frank@example.org", PASSWORD)
        add_member("alpha", "frank", can_upload=True)  # a member, but without api_instance_upload
    large = make_instance("PAT-1", "1.2.3.1", "1.2.3.1.1", "1.2.3.1.1.1", rows=800, columns=800)
    oversized = make_instance("PAT-1", "1.2.3.1", "1.2.3.1.1", "1.2.3.1.1.1", rows=1500, columns=1500)
    assert 1 << 20 < len(large) < 4 * 1024 * 1024 < len(oversized)  # over 1 MiB; the app fixture's MAX_UPLOAD_MB
    for data in (large, oversized):
        assert_error(api.upload(data, headers=credentials("alice", "wrong")), 401, "not_authenticated", None)
        assert_error(api.upload(data, headers=credentials("nobody")), 401, "not_authenticated", None)
        assert_error(api.upload(data, headers=credentials("frank")), 403, "api_call_not_allowed", None)
    body, content_type = encode_multipart_formdata({"Project": "alpha", "file": ("a.dcm", large)})
    response = api.client.delete("/api/v1/series/delete/", data=body, content_type=content_type,
                                 headers=credentials("alice", "wrong"))
    assert_error(response, 401, "not_authenticated", None)
    small, content_type = encode_multipart_formdata({"Project": "alpha", "Archive": "main", "file": ("a.dcm", instance(1))})
    unsized = api.client.post(UPLOAD_URL, data=small, content_type=content_type,  # chunked: no length to trust
                              headers={**credentials("alice", "wrong"), "Transfer-Encoding": "chunked"})
    assert_error(unsized, 401, "not_authenticated", None)
    assert spooled == []
    assert row_counts(seeded) == NOTHING


def test_upload_needs_the_api_instance_upload_permission(api_for, seeded):
    with seeded.app_context():
        create_user("dave", "dave@example.org", PASSWORD)
        grant("dave", [name for name in API_PERMISSIONS if name != "api_instance_upload"])
        add_member("alpha", "dave", can_upload=True)
    dave = api_for("dave")
    assert_error(upload(dave, instance(1)), 403, "api_call_not_allowed", None)
    # The permission is checked before the parameters.
    bare = dave.client.post(UPLOAD_URL, data={}, headers=dave.headers)
    assert_error(bare, 403, "api_call_not_allowed", None)
    assert_nothing_stored(seeded)


def test_member_without_upload_right_is_refused(api_for, seeded):
    assert_error(upload(api_for("carol"), instance(1)), 403, "api_call_not_allowed", None)
    assert_nothing_stored(seeded)


def test_non_member_learns_nothing_about_the_project(api_for, seeded):
    bob = api_for("bob")
    data = instance(1)
    for archive in ("main", "no-such-archive"):
        outsider = upload(bob, data, project="alpha", archive=archive)
        missing = upload(bob, data, project="no-such-project", archive=archive)
        assert error_triple(outsider) == error_triple(missing) == (404, "object_not_found", "project_not_found")
    assert_nothing_stored(seeded)


def test_unknown_archive(api, seeded):
    assert_error(upload(api, instance(1), archive="no-such-archive"), 404, "object_not_found", "archive_not_found")
    assert_nothing_stored(seeded)


@pytest.mark.parametrize("missing", ["Project", "Archive"])
def test_missing_project_or_archive(api, seeded, missing):
    form = {"Project": "alpha", "Archive": "main", "file": (io.BytesIO(instance(1)), "a.dcm")}
    del form[missing]
    response = api.client.post(UPLOAD_URL, data=form, headers=api.headers)
    assert_error(response, 400, "invalid_post_value", "missing_parameter")
    assert missing in response.get_json()["message"]
    assert_nothing_stored(seeded)


def test_get_on_the_upload_url(api, seeded):
    response = api.client.get(UPLOAD_URL, query_string={"Project": "alpha", "Archive": "main"}, headers=api.headers)
    assert_error(response, 405, "method_not_allowed", None)
    assert_nothing_stored(seeded)


# --- crash safety -------------------------------------------------------------------------------------------


def _record_placed_keys(monkeypatch, then_raise):
    """Wrap FileStorage.place: record each key placed and optionally fail once the file is there."""
    placed = []
    real_place = FileStorage.place

    def place(self, handle, key):
        real_place(self, handle, key)
        placed.append(key)
        assert self.exists(key)
        if then_raise:
            raise OSError("disk on fire after the rename")

    monkeypatch.setattr(FileStorage, "place", place)
    return placed


def _assert_clean_500(response):
    assert_error(response, 500, "internal_error", None)
    text = response.get_data(as_text=True)
    for leak in ("Traceback", 'File "', "disk on fire", "commit refused", "OperationalError"):
        assert leak not in text


def test_failed_commit_after_the_file_was_placed_leaves_nothing(api, seeded, monkeypatch):
    placed = _record_placed_keys(monkeypatch, then_raise=False)

    def failing_commit(session):
        raise OperationalError("COMMIT", {}, Exception("commit refused: connection lost"))

    with seeded.app_context():
        session_class = type(db.session())  # flask-sqlalchemy's Session, used by every request
    monkeypatch.setattr(session_class, "commit", failing_commit)

    response = upload(api, instance(1))

    _assert_clean_500(response)
    assert len(placed) == 1  # the file really had reached its place before the commit failed
    assert_nothing_stored(seeded)
    monkeypatch.undo()
    assert upload(api, instance(1)).status_code == 200  # and the same upload works once the store does
    assert len(stored_keys(seeded)) == 1


def test_failure_right_after_placing_the_file_leaves_nothing(api, seeded, monkeypatch):
    placed = _record_placed_keys(monkeypatch, then_raise=True)

    response = upload(api, instance(1))

    _assert_clean_500(response)
    assert len(placed) == 1
    assert_nothing_stored(seeded)  # neither the row nor the file that was moved into place


@pytest.mark.parametrize(
    "module, function, error",
    [
        (dicom_ingest, "_check_complete", AttributeError("'DataElement' object has no attribute 'value_tell'")),
        (dicom_ingest, "_date", TypeError("a bug in our extraction")),
        (dicom_ingest, "_time", ValueError("a bug in our extraction")),
        (pydicom, "dcmread", OSError(errno.EIO, "Input/output error")),  # the disk, not the file
    ],
    ids=["AttributeError", "TypeError", "ValueError", "EIO"],
)
def test_a_bug_or_a_disk_error_while_reading_is_a_logged_500_not_a_400(api, seeded, monkeypatch, caplog, module,
                                                                         function, error):
    monkeypatch.setattr(module, function, mock.Mock(side_effect=error))
    response = upload(api, instance(1))
    _assert_clean_500(response)
    assert str(error) not in response.get_data(as_text=True)
    [logged] = [record for record in caplog.records if record.name == "gateway.v1" and record.exc_info]
    assert logged.exc_info[1] is error
    assert_nothing_stored(seeded)


def _postgresql_only(app):
    with app.app_context():
        if db.engine.dialect.name != "postgresql":
            pytest.skip("SQLite's write lock keeps a delete from committing under an upload")


def _wait_until_another_session_waits_for(connection, timeout=10):
    # pg_locks, not pg_stat_activity: the latter stays as first read inside the transaction
    blocked = text("SELECT count(*) FROM pg_locks WHERE NOT granted AND pg_backend_pid() = ANY(pg_blocking_pids(pid))")
    deadline = time.monotonic() + timeout
    while not connection.execute(blocked).scalar():
        assert time.monotonic() < deadline, "the upload never waited for the delete's lock"
        time.sleep(0.02)


def _assert_tried_again(caplog):
    retries = [record for record in caplog.records if "lost a race with a delete; trying again" in record.getMessage()]
    assert len(retries) == 1


def test_an_upload_whose_series_is_deleted_under_it_is_stored_anew(api, seeded, caplog):
    """The delete commits while the upload's insert waits on the series row: the insert's parent is gone."""
    _postgresql_only(seeded)
    caplog.set_level(logging.INFO, logger="gateway.archive")
    assert upload(api, instance(1)).status_code == 200
    with seeded.app_context(), write_engine().connect() as deleter:
        deleter.execute(delete(series))  # uncommitted: it holds the series row
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(upload, api, instance(2))
            try:
                _wait_until_another_session_waits_for(deleter)
            finally:  # the upload waits for this, whatever happened
                deleter.commit()
            response = pending.result(timeout=30)
    assert response.status_code == 200, response.get_json()
    _assert_tried_again(caplog)
    assert [row.sop_instance_uid for row in instance_rows(seeded)] == [ids_of(instance(2))["SOPInstanceUID"]]
    assert list(series_files(api, ids_of(instance(2))).values()) == [instance(2)]


def test_a_repeated_upload_whose_instance_is_deleted_under_it_is_stored_anew(api, seeded, monkeypatch, caplog):
    """The delete commits between the upload's lookup and its comparison with the stored file."""
    _postgresql_only(seeded)
    caplog.set_level(logging.INFO, logger="gateway.archive")
    assert upload(api, instance(1)).status_code == 200
    compare = filecmp.cmp

    def delete_then_compare(ours, stored, shallow=True):
        with seeded.app_context(), write_engine().begin() as deleter:
            deleter.execute(delete(series))
        os.remove(stored)  # as the delete's own clean-up would
        return compare(ours, stored, shallow)

    monkeypatch.setattr("gateway.archive.filecmp.cmp", delete_then_compare)
    response = upload(api, instance(1))
    assert response.status_code == 200, response.get_json()
    _assert_tried_again(caplog)
    assert row_counts(seeded) == {"patients": 1, "studies": 1, "series": 1, "instances": 1}
    assert list(series_files(api, ids_of(instance(1))).values()) == [instance(1)]


def test_storage_folders_and_placed_files_are_synced(tmp_path, monkeypatch):
    """Opening the storage makes its folders and syncs their entries; placing a file syncs its bytes under
    their final name, then the file's entry."""
    synced = []
    sync = os.fsync

    def recording_sync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        sync(descriptor)

    monkeypatch.setattr("gateway.storage.os.fsync", recording_sync)
    files = FileStorage(tmp_path)
    assert synced == [str(tmp_path)]
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{number:02x}" for number in range(256)] + ["tmp"]
    synced.clear()
    handle = files.temp_file()
    handle.write(b"DICM")
    key = files.new_key()
    files.place(handle, key)
    assert synced == [str(tmp_path / key), str((tmp_path / key).parent)]
    assert (tmp_path / key).read_bytes() == b"DICM"


def test_a_broken_multipart_body_is_a_400_that_leaves_nothing(api, seeded):
    body, content_type = encode_multipart_formdata({"Project": "alpha", "Archive": "main", "file": ("a.dcm", instance())})
    for broken in (body[: len(body) // 2], body.replace(b"--\r\n", b"")):  # cut short; no closing boundary
        response = api.client.post(UPLOAD_URL, data=broken, content_type=content_type, headers=api.headers)
        assert_error(response, 400, "invalid_post_value", None)
        assert "multipart body could not be read" in response.get_json()["message"]
        assert temp_files(seeded) == []
    assert_nothing_stored(seeded)


@pytest.mark.store_independent
def test_an_oversized_text_field_is_a_413(api, seeded):
    fields = {"Project": "alpha" * 200_000, "Archive": "main", "file": ("a.dcm", instance())}
    response = api.post("instance/upload/", fields)
    assert_error(response, 413, "invalid_post_value", "file_too_large")
    assert temp_files(seeded) == []


def upload_with_fields(api, fields, number=1):
    """An upload of instance `number` whose body also holds `fields` ((name, value) pairs or RequestFields)
    first. A refused body gets another instance than the accepted one, so that storing it would show."""
    everything = [("Project", "alpha"), ("Archive", "main"), *fields, ("file", ("a.dcm", instance(number)))]
    response = api.post("instance/upload/", everything)
    assert temp_files(api.client.application) == []
    return response


def test_a_body_of_more_parts_than_flask_reads_is_a_400_that_says_so(api, seeded):
    limit = seeded.config["MAX_FORM_PARTS"]
    assert limit == 1000  # Flask's default, as the docs state
    padding = [(f"note{number}", "x") for number in range(limit - 3)]  # beside Project, Archive and file
    assert upload_with_fields(api, padding).status_code == 200
    response = upload_with_fields(api, [*padding, ("one_more", "x")], number=2)
    assert_error(response, 400, "invalid_post_value", None)
    assert response.get_json()["message"] == f"the multipart body has more than {limit} parts"
    assert row_counts(seeded)["instances"] == 1


def test_a_text_field_may_hold_max_form_memory_size_bytes(api, seeded):
    limit = seeded.config["MAX_FORM_MEMORY_SIZE"]
    assert limit == 500_000  # Flask's default, as the docs state
    assert upload_with_fields(api, [("note", "é" * (limit // 2))]).status_code == 200  # bytes, not characters
    response = upload_with_fields(api, [("other_note", "é" * (limit // 2) + "x")], number=2)
    assert_error(response, 413, "invalid_post_value", "file_too_large")
    assert row_counts(seeded)["instances"] == 1


def field_with_header(value_bytes=0, extra_headers=0):
    """A text field whose part carries a header line of `value_bytes` after its name, or extra headers."""
    field = RequestField("note", "x")
    field.make_multipart()
    if value_bytes:
        field.headers["X-Padding"] = "a" * value_bytes
    for number in range(extra_headers):
        field.headers[f"X-Extra-{number}"] = "x"
    return field


# multipart's own limits on a part's headers: a line of 4,224 bytes, 8 lines
LONGEST_HEADER_LINE = 4096 + 128
MOST_HEADERS = 8


@pytest.mark.parametrize("inside, outside", [
    (field_with_header(value_bytes=LONGEST_HEADER_LINE - len("X-Padding: ")),
     field_with_header(value_bytes=LONGEST_HEADER_LINE - len("X-Padding: ") + 1)),
    (field_with_header(extra_headers=MOST_HEADERS - 1), field_with_header(extra_headers=MOST_HEADERS)),
], ids=["header line", "header count"])
def test_part_headers_beyond_the_parsers_limits_are_a_400_that_says_so(api, seeded, inside, outside):
    assert upload_with_fields(api, [inside]).status_code == 200
    response = upload_with_fields(api, [outside], number=2)
    assert_error(response, 400, "invalid_post_value", None)
    assert response.get_json()["message"].startswith("the multipart body could not be read: Maximum segment header")
    assert row_counts(seeded)["instances"] == 1


def test_a_body_shorter_than_its_content_length_is_a_400_that_leaves_nothing(api, seeded):
    """The client went away mid-file: the part spooled so far is removed."""
    body, content_type = encode_multipart_formdata({"Project": "alpha", "Archive": "main", "file": ("a.dcm", instance())})
    response = api.client.post(UPLOAD_URL, input_stream=io.BytesIO(body[:-1000]), content_length=len(body),
                               content_type=content_type, headers=api.headers)
    assert_error(response, 400, "invalid_post_value", None)
    assert_nothing_stored(seeded)
