"""Synthetic DICOM instances, made with pydicom: for the demo data, the tests and the benchmarks."""
import io

from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
DEMO_UID_ROOT = "1.2.826.0.1.3680043.8.498.7770."


def make_instance(
    patient_id,
    study_uid,
    series_uid,
    sop_uid,
    *,
    rows=64,
    columns=64,
    modality="CT",
    sop_class_uid=CT_IMAGE_STORAGE,
    patient_name="Anonymous",
    patient_sex="O",
    patient_birth_date="19000101",
    study_date="20240102",
    study_time="101500",
    study_description="Synthetic study",
    series_description="Synthetic series",
    instance_number=1,
    pixel_seed=0,
):
    """The bytes of a Part 10 file with a 16-bit monochrome image of rows × columns; deterministic."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    dataset = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = sop_class_uid
    dataset.SOPInstanceUID = sop_uid
    dataset.PatientID = patient_id
    dataset.PatientName = patient_name
    dataset.PatientSex = patient_sex
    dataset.PatientBirthDate = patient_birth_date
    dataset.StudyInstanceUID = study_uid
    dataset.StudyDate = study_date
    dataset.StudyTime = study_time
    dataset.StudyDescription = study_description
    dataset.ReferringPhysicianName = "Referrer^Demo"
    dataset.InstitutionName = "Demo Hospital"
    dataset.AccessionNumber = ("ACC-" + patient_id)[:16]
    dataset.SeriesInstanceUID = series_uid
    dataset.SeriesDate = study_date
    dataset.SeriesTime = study_time
    dataset.SeriesDescription = series_description
    dataset.Modality = modality
    dataset.Manufacturer = "Synthetic Imaging"
    dataset.ManufacturerModelName = "pydicom"
    dataset.SeriesNumber = 1
    dataset.InstanceNumber = instance_number
    dataset.Rows = rows
    dataset.Columns = columns
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 16
    dataset.BitsStored = 12
    dataset.HighBit = 11
    dataset.PixelRepresentation = 0
    pattern = bytes((pixel_seed + index) % 251 for index in range(4096))
    size = rows * columns * 2
    dataset.PixelData = (pattern * (size // len(pattern) + 1))[:size]

    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
