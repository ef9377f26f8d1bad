"""DICOM in and out: series assembly, NIfTI and DICOM SEG writers."""
