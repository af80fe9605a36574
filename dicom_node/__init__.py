"""The DICOM node: receives MR studies, finds the series the model needs, queues and returns results."""

__version__ = "0.1.0"
