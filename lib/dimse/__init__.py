"""DIMSE: a Storage SCP that takes CT series into the datastore and can send DICOM-SEG results on."""

from .storage_scp import Destination, SCPConfig, SeriesError, StorageSCP, check_series

__all__ = ["Destination", "SCPConfig", "SeriesError", "StorageSCP", "check_series"]
