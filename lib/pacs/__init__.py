"""Hospital integration: a development PACS (Orthanc over DICOMweb and DIMSE, loopback only)."""

from .credentials import read_credentials, use_dicomweb_credentials
from .orthanc import OrthancPACS, PACSError

__all__ = ["OrthancPACS", "PACSError", "read_credentials", "use_dicomweb_credentials"]
