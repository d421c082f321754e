"""Reading an uploaded DICOM file: validation and the tags the archive keeps.

pydicom reads the file in one pass without force, skipping over (not loading) large values such as the
pixel data; a file that ends inside an element is refused.
"""
import datetime
from dataclasses import dataclass

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian

from .errors import InvalidValue

UID_KEYWORDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_UNDEFINED_LENGTH = 0xFFFFFFFF
_DEFER_BYTES = 4096  # values larger than this (pixel data) are skipped over, not read


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
    try:
        dataset = pydicom.dcmread(handle, defer_size=_DEFER_BYTES)
        _check_complete(handle, dataset, size)
        tags = _extract(dataset)
    except InvalidDicom:
        raise
    except InvalidDicomError:
        raise InvalidDicom("the file is not DICOM (no Part 10 preamble and file meta header)") from None
    except Exception:  # pydicom raises many kinds of error on malformed input; all mean the same here
        raise InvalidDicom("the file is not a readable DICOM file") from None
    return tags


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


def _text(dataset, keyword, limit):
    value = dataset.get(keyword)
    if value is None:
        return None
    if isinstance(value, MultiValue):
        value = "\\".join(str(item) for item in value)
    text = str(value).replace("\x00", "").strip()
    return text[:limit] or None


def _uid(dataset, keyword):
    raw = dataset.get(keyword)
    if raw is not None and "\x00" in str(raw).rstrip("\x00 "):
        raise InvalidDicom(f"{keyword} holds a NUL character")
    value = _text(dataset, keyword, 1000)
    if value is None:
        raise InvalidDicom(f"the file has no {keyword}")
    if len(value) > 64:
        raise InvalidDicom(f"{keyword} is longer than 64 characters")
    return value


def _date(dataset, keyword):
    text = _text(dataset, keyword, 32)
    if not text:
        return None
    try:
        return datetime.datetime.strptime(text.replace(".", "")[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _time(dataset, keyword):
    """DICOM TM (HHMMSS.FFFFFF, trailing parts optional) as HH:MM:SS with any fraction kept."""
    text = _text(dataset, keyword, 32)
    if not text:
        return None
    whole, _, fraction = text.replace(":", "").partition(".")
    if not whole.isdigit() or len(whole) not in (2, 4, 6) or (fraction and not fraction.isdigit()):
        return None
    hours, minutes, seconds = whole[0:2], whole[2:4] or "00", whole[4:6] or "00"
    if int(hours) > 23 or int(minutes) > 59 or int(seconds) > 60:
        return None
    formatted = f"{hours}:{minutes}:{seconds}"
    return f"{formatted}.{fraction[:6]}" if fraction else formatted


def _extract(dataset):
    sop_class_uid = _text(dataset, "SOPClassUID", 64)
    return InstanceTags(
        patient={
            "patient_id": _uid(dataset, "PatientID"),
            "patient_name": _text(dataset, "PatientName", 324),
            "patient_sex": _text(dataset, "PatientSex", 16),
            "patient_birth_date": _date(dataset, "PatientBirthDate"),
        },
        study={
            "study_instance_uid": _uid(dataset, "StudyInstanceUID"),
            "study_date": _date(dataset, "StudyDate"),
            "study_time": _time(dataset, "StudyTime"),
            "study_description": _text(dataset, "StudyDescription", 324),
            "referring_physician_name": _text(dataset, "ReferringPhysicianName", 324),
            "institution_name": _text(dataset, "InstitutionName", 324),
            "accession_number": _text(dataset, "AccessionNumber", 64),
        },
        series={
            "series_instance_uid": _uid(dataset, "SeriesInstanceUID"),
            "sop_class_uid": sop_class_uid,
            "series_date": _date(dataset, "SeriesDate"),
            "series_time": _time(dataset, "SeriesTime"),
            "series_description": _text(dataset, "SeriesDescription", 324),
            "manufacturer": _text(dataset, "Manufacturer", 324),
            "manufacturer_model_name": _text(dataset, "ManufacturerModelName", 324),
        },
        instance={
            "sop_instance_uid": _uid(dataset, "SOPInstanceUID"),
            "sop_class_uid": sop_class_uid,
        },
    )
