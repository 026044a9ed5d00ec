"""dicom-forwarder: forward DICOM files dropped into folders to DICOM peers with C-STORE."""

__version__ = "0.1.0"
