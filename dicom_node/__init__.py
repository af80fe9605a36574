"""The DICOM node: receives MR studies, finds the series the model needs, queues and returns results."""

# The one version number: setup.cfg reads it, and the outputs carry it (SEG/SR SoftwareVersions, summary.json,
# `dicom-node --version`, `status`, the dashboard's footer and /api/health). CHANGELOG.md says what changed.
__version__ = "0.2.0"
