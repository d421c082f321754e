"""Reading an uploaded DICOM file: validation and the tags the archive keeps.

pydicom reads the file in one pass without force, skipping over (not loading) large values such as the
pixel data; a file that ends inside an element is refused.
"""
import datetime
import re
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import pydicom
from pydicom.charset import convert_encodings
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.values import convert_text

from .errors import InvalidValue

# The SR Storage SOP classes (PS3.4 B.5) whose content tree is a report, which the report annotator reads.
REPORT_SOP_CLASSES = frozenset({
    pydicom.uid.BasicTextSRStorage,
    pydicom.uid.EnhancedSRStorage,
    pydicom.uid.ComprehensiveSRStorage,
    pydicom.uid.Comprehensive3DSRStorage,
    pydicom.uid.ExtensibleSRStorage,
})
_UNDEFINED_LENGTH = 0xFFFFFFFF
_DEFER_BYTES = 4096  # values larger than this (pixel data) are skipped over, not read
# What pydicom raises on malformed input, found by reading its own test files and tens of thousands of
# truncated and mangled copies of them (TypeError: a character set element of another VR; RecursionError:
# sequences nested thousands deep). Anything else is a bug, ours or pydicom's, and stays a 500.
_MALFORMED_INPUT_ERRORS = (
    BytesLengthException, NotImplementedError, OSError, RecursionError, TypeError, ValueError, struct.error, zlib.error,
)
# The UI value representation: components of digits joined by single dots (64 characters at most).
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_DIGITS = re.compile("[0-9]+")  # str.isdigit() would pass "³", which int() refuses


class InvalidDicom(InvalidValue):
    def __init__(self, message):
        super().__init__("invalid_dicom", message)


@dataclass
class InstanceTags:
    patient: dict
    study: dict
    series: dict
    instance: dict

    @property
    def patient_id(self):
        return self.patient["patient_id"]

    @property
    def study_uid(self):
        return self.study["study_instance_uid"]

    @property
    def series_uid(self):
        return self.series["series_instance_uid"]

    @property
    def sop_uid(self):
        return self.instance["sop_instance_uid"]


def read_instance(handle, size):
    """Validate the DICOM file open in `handle` (`size` bytes) and return its tags, or raise InvalidDicom."""
    handle.seek(0)
    with _parsing():
        dataset = pydicom.dcmread(handle, defer_size=_DEFER_BYTES)
    _check_complete(handle, dataset, size)
    return _extract(dataset)


@contextmanager
def _parsing():
    """Where pydicom reads the file: what it raises on malformed input becomes an InvalidDicom."""
    try:
        yield
    except InvalidDicomError:
        raise InvalidDicom("the file is not DICOM (no Part 10 preamble and file meta header)") from None
    except _MALFORMED_INPUT_ERRORS as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise  # the disk failed, not the file (pydicom's own OSErrors carry no errno)
        raise InvalidDicom("the file is not a readable DICOM file") from None


def _check_complete(handle, dataset, size):
    """The last element read must end exactly where the file does.

    pydicom stops quietly at a partial element header and keeps a value shorter than its declared
    length; either can only be the file's last element, so its end tells a truncated file.
    """
    if dataset.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return  # the dataset is one zlib stream, which pydicom already had to inflate whole
    if not dataset._dict:
        raise InvalidDicom("the file holds no dataset")
    last = next(reversed(dataset._dict.values()))
    length = getattr(last, "length", _UNDEFINED_LENGTH)  # an undefined-length sequence comes back parsed
    end = handle.tell() if length == _UNDEFINED_LENGTH else last.value_tell + length
    if end != size:
        raise InvalidDicom("the file ends inside a data element (truncated)")


class _RawValues:
    """The tags the archive keeps, decoded straight from pydicom's raw elements.

    Going through Dataset attribute access (element conversion, value validation) for these two dozen
    tags costs twice as much as reading the whole file.
    """

    def __init__(self, dataset):
        self._dataset = dataset
        self._raw = dataset._dict  # pydicom's own element store: raw until something converts them
        charset = self._raw.get(0x00080005)
        names = charset.value if charset is not None else None  # pydicom converts this one while reading
        if isinstance(names, bytes):
            names = names.decode("latin-1").split("\\")
        with _parsing():
            self._encodings = convert_encodings(names or None)

    def _bytes(self, tag):
        element = self._raw.get(tag)
        return element.value if isinstance(element, RawDataElement) and isinstance(element.value, bytes) else None

    def get(self, keyword):
        tag = tag_for_keyword(keyword)
        value = self._bytes(tag)
        with _parsing():
            if value is not None:
                value = convert_text(value, self._encodings)
            elif tag in self._raw:  # converted already, or too large to have been read: pydicom converts it
                value = self._dataset[tag].value
        if isinstance(value, (list, MultiValue)):
            value = "\\".join(str(item) for item in value)
        return value


def _text(values, keyword, limit):
    value = values.get(keyword)
    if value is None:
        return None
    text = str(value).replace("\x00", "").strip()
    return text[:limit] or None


def _identifier(values, keyword, required=True):
    """PatientID or a UID, without its trailing padding: None only when absent and not `required`."""
    raw = values.get(keyword)
    if raw is not None and "\x00" in str(raw).rstrip("\x00 "):
        raise InvalidDicom(f"{keyword} holds a NUL character")
    value = _text(values, keyword, 1000)
    if value is None:
        if required:
            raise InvalidDicom(f"the file has no {keyword}")
        return None
    if len(value) > 64:
        raise InvalidDicom(f"{keyword} is longer than 64 characters")
    return value


def _uid(values, keyword, required=True):
    """A UID as the UI value representation has it: the archive names zip entries after them."""
    value = _identifier(values, keyword, required)
    if value is not None and not _UID.fullmatch(value):
        raise InvalidDicom(f"{keyword} is not a UID (digits and single dots between them): {value!r}")
    return value


def _date(values, keyword):
    text = _text(values, keyword, 32)
    if not text:
        return None
    try:
        return datetime.datetime.strptime(text.replace(".", "")[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _time(values, keyword):
    """DICOM TM (HHMMSS.FFFFFF, trailing parts optional) as HH:MM:SS with any fraction kept."""
    text = _text(values, keyword, 32)
    if not text:
        return None
    whole, _, fraction = text.replace(":", "").partition(".")
    if not _DIGITS.fullmatch(whole) or len(whole) not in (2, 4, 6) or (fraction and not _DIGITS.fullmatch(fraction)):
        return None
    hours, minutes, seconds = whole[0:2], whole[2:4] or "00", whole[4:6] or "00"
    if int(hours) > 23 or int(minutes) > 59 or int(seconds) > 60:
        return None
    formatted = f"{hours}:{minutes}:{seconds}"
    return f"{formatted}.{fraction[:6]}" if fraction else formatted


def _extract(dataset):
    values = _RawValues(dataset)
    sop_class_uid = _uid(values, "SOPClassUID", required=False)
    return InstanceTags(
        patient={
            "patient_id": _identifier(values, "PatientID"),
            "patient_name": _text(values, "PatientName", 324),
            "patient_sex": _text(values, "PatientSex", 16),
            "patient_birth_date": _date(values, "PatientBirthDate"),
        },
        study={
            "study_instance_uid": _uid(values, "StudyInstanceUID"),
            "study_date": _date(values, "StudyDate"),
            "study_time": _time(values, "StudyTime"),
            "study_description": _text(values, "StudyDescription", 324),
            "referring_physician_name": _text(values, "ReferringPhysicianName", 324),
            "institution_name": _text(values, "InstitutionName", 324),
            "accession_number": _text(values, "AccessionNumber", 64),
        },
        series={
            "series_instance_uid": _uid(values, "SeriesInstanceUID"),
            "sop_class_uid": sop_class_uid,
            "series_date": _date(values, "SeriesDate"),
            "series_time": _time(values, "SeriesTime"),
            "series_description": _text(values, "SeriesDescription", 324),
            "manufacturer": _text(values, "Manufacturer", 324),
            "manufacturer_model_name": _text(values, "ManufacturerModelName", 324),
        },
        instance={
            "sop_instance_uid": _uid(values, "SOPInstanceUID"),
            "sop_class_uid": sop_class_uid,
        },
    )
