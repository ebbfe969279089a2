"""Data shipped with the package: the body part table and the vendored ImagingStudy schemas."""
