"""A synthetic archive for the QIDO-RS tests and benchmarks/qido: tiny instances, varied study attributes."""

from __future__ import annotations

import datetime
import io
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, SecondaryCaptureImageStorage

_ROOT = "1.2.826.0.1.3680043.8.498.22"  # pydicom's UID root + this issue; then kind.study.series.instance
_SURNAMES = ("Smith", "SMITHSON", "Doe", "Müller", "o'Brien", "Nguyen", "Garcia", "smith", "Lee", "Schmidt")
_GIVEN = ("John", "ANNA", "Li", "Jörg", "Maria", "Wei", "")
_MODALITIES = ("CT", "MR", "CR", "US", "CT")
_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}
_EPOCH = datetime.date(2015, 1, 1)


@dataclass(frozen=True)
class StudySpec:
    """One synthetic study: its attributes and series (modality per series)."""

    index: int
    study_uid: str
    patient_name: str
    patient_id: str
    study_date: str
    study_time: str
    accession: str
    referring: str
    description: str
    modalities: tuple[str, ...]

    def series_uid(self, k: int) -> str:
        return f"{_ROOT}.2.{self.index}.{k + 1}"

    def sop_uid(self, k: int, j: int) -> str:
        return f"{_ROOT}.3.{self.index}.{k + 1}.{j + 1}"


def study_spec(i: int, *, series: int = 1) -> StudySpec:
    """The ``i``-th study of the synthetic archive (deterministic). Every 7th has no AccessionNumber and every
    11th no PatientName; dates spread over 2015–2024; ``series`` > 1 adds series of other modalities."""
    name = "" if i % 11 == 10 else f"{_SURNAMES[i % len(_SURNAMES)]}^{_GIVEN[(i // 3) % len(_GIVEN)]}".rstrip("^")
    day = _EPOCH + datetime.timedelta(days=(i * 37) % 3650)
    mods = tuple(_MODALITIES[(i + k) % len(_MODALITIES)] for k in range(series))
    return StudySpec(
        index=i, study_uid=f"{_ROOT}.1.{i}", patient_name=name, patient_id=f"PID{i:06d}",
        study_date=day.strftime("%Y%m%d"), study_time=f"{(i * 7) % 24:02d}{(i * 13) % 60:02d}{(i * 17) % 60:02d}",
        accession="" if i % 7 == 6 else f"ACC{i:07d}", referring=f"Ref^{_SURNAMES[(i // 2) % len(_SURNAMES)]}",
        description=f"Study {i % 13} {'chest' if i % 2 else 'head'}", modalities=mods,
    )


def instance_bytes(spec: StudySpec, k: int, j: int = 0) -> bytes:
    """Series ``k``, instance ``j`` of ``spec`` as a Part 10 file (a 2 × 2 image)."""
    modality = spec.modalities[k]
    sop_class = _CLASSES.get(modality, SecondaryCaptureImageStorage)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = spec.sop_uid(k, j)
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid(k)
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.AccessionNumber = spec.accession
    ds.ReferringPhysicianName = spec.referring
    ds.StudyDescription = spec.description
    ds.StudyID = str(spec.index % 1000)
    ds.Modality = modality
    ds.SeriesNumber = k + 1
    ds.SeriesDescription = f"Series {k + 1}"
    ds.InstanceNumber = j + 1
    ds.Rows = ds.Columns = 2
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def archive(start: int, stop: int, *, series: int = 1) -> Iterator[tuple[StudySpec, list[bytes]]]:
    """Studies ``start``..``stop - 1`` with their files (one instance per series)."""
    for i in range(start, stop):
        spec = study_spec(i, series=series)
        yield spec, [instance_bytes(spec, k) for k in range(series)]
