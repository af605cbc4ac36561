"""Hospital integration: a development PACS (Orthanc over DICOMweb and DIMSE, loopback only)."""

from .orthanc import OrthancPACS, PACSError

__all__ = ["OrthancPACS", "PACSError"]
