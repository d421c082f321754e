"""The report text of a DICOM Structured Report: its content tree as plain text with section headings.

Each CONTAINER item is a heading of its own line, followed by what it contains; a TEXT, CODE, NUM, PNAME,
DATE, TIME, DATETIME or UIDREF item is a line `Concept name: value`. Items that only point elsewhere (IMAGE,
COMPOSITE, WAVEFORM, SCOORD, TCOORD) carry no report text and are left out. A text value written as HTML
(some reporting systems do) is read for its text.
"""
import datetime
from html.parser import HTMLParser

import pydicom.uid

from ..dicom_ingest import REPORT_SOP_CLASSES

# The modality of an image's SOP class, for a report's ModalitiesInStudy when its SR does not carry the tag.
MODALITY_OF_SOP_CLASS = {
    pydicom.uid.CTImageStorage: "CT",
    pydicom.uid.EnhancedCTImageStorage: "CT",
    pydicom.uid.MRImageStorage: "MR",
    pydicom.uid.EnhancedMRImageStorage: "MR",
    pydicom.uid.ComputedRadiographyImageStorage: "CR",
    pydicom.uid.DigitalXRayImageStorageForPresentation: "DX",
    pydicom.uid.DigitalXRayImageStorageForProcessing: "DX",
    pydicom.uid.DigitalMammographyXRayImageStorageForPresentation: "MG",
    pydicom.uid.UltrasoundImageStorage: "US",
    pydicom.uid.UltrasoundMultiFrameImageStorage: "US",
    pydicom.uid.NuclearMedicineImageStorage: "NM",
    pydicom.uid.PositronEmissionTomographyImageStorage: "PT",
    pydicom.uid.XRayAngiographicImageStorage: "XA",
    pydicom.uid.XRayRadiofluoroscopicImageStorage: "RF",
    pydicom.uid.OphthalmicPhotography8BitImageStorage: "OP",
    pydicom.uid.VLPhotographicImageStorage: "XC",
    **dict.fromkeys(REPORT_SOP_CLASSES, "SR"),
}

_VALUE_TYPES_WITHOUT_TEXT = frozenset({"IMAGE", "COMPOSITE", "WAVEFORM", "SCOORD", "SCOORD3D", "TCOORD"})
_MAX_DEPTH = 50  # a content tree nested deeper than any real report is read no further


def report_text(dataset):
    """The plain text of an SR dataset's content tree, its title (the document's concept name) first."""
    lines = []
    title = _concept_name(dataset)
    if title:
        lines.append(title)
    _add_items(lines, dataset.get("ContentSequence", []), depth=0)
    return "\n".join(lines).strip() + "\n"


def _add_items(lines, items, depth):
    if depth > _MAX_DEPTH:
        return
    for item in items:
        value_type = item.get("ValueType", "")
        name = _concept_name(item)
        if value_type == "CONTAINER":
            lines.extend(["", name] if name else [""])
        elif value_type not in _VALUE_TYPES_WITHOUT_TEXT:
            value = _value(item, value_type)
            if value:
                lines.append(f"{name}: {value}" if name else value)
        _add_items(lines, item.get("ContentSequence", []), depth + 1)


def _concept_name(item):
    codes = item.get("ConceptNameCodeSequence")
    return str(codes[0].get("CodeMeaning", "")).strip() if codes else ""


def _value(item, value_type):
    if value_type == "TEXT":
        return _plain_text(str(item.get("TextValue", "")))
    if value_type == "CODE":
        codes = item.get("ConceptCodeSequence")
        return str(codes[0].get("CodeMeaning", "")).strip() if codes else ""
    if value_type == "NUM":
        return _measurement(item)
    if value_type == "PNAME":
        name = item.get("PersonName")
        return " ".join(filter(None, (name.given_name, name.family_name))) or str(name) if name else ""
    if value_type == "DATE":
        return _iso_date(str(item.get("Date", "")))
    if value_type in ("TIME", "DATETIME", "UIDREF"):
        return str(item.get({"TIME": "Time", "DATETIME": "DateTime", "UIDREF": "UID"}[value_type], "")).strip()
    return ""


def _measurement(item):
    measured = item.get("MeasuredValueSequence")
    if not measured:
        return ""
    value = measured[0].get("NumericValue")
    units = measured[0].get("MeasurementUnitsCodeSequence")
    unit = str(units[0].get("CodeValue", "")).strip() if units else ""
    text = "" if value is None else str(value).strip()
    return f"{text} {unit}" if text and unit and unit != "1" else text  # UCUM "1": no unit


def _iso_date(value):
    try:
        return datetime.datetime.strptime(value.strip(), "%Y%m%d").date().isoformat()
    except ValueError:
        return value.strip()


class _TextOfHtml(HTMLParser):
    """The text of an HTML fragment: what a browser would show of it, a block element a line break."""

    _BLOCKS = frozenset({"p", "br", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol"})
    _HIDDEN = frozenset({"style", "script", "head", "title"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.hidden = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self._HIDDEN:
            self.hidden += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self._HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)


def _plain_text(value):
    """value, or the text of it when it is HTML; runs of blank lines and spaces closed up."""
    if "<" in value and ">" in value:
        parser = _TextOfHtml()
        parser.feed(value)
        parser.close()
        value = "".join(parser.parts)
    lines = (" ".join(line.split()) for line in value.splitlines())
    return "\n".join(line for line in lines if line).strip()
