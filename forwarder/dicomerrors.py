"""Why a file cannot be sent as it is: InvalidDicom and its kinds."""

from __future__ import annotations

from pathlib import Path

__all__ = ["BadUID", "InvalidDicom", "MissingUID", "NotDicom", "Truncated"]


class InvalidDicom(ValueError):
    """The file cannot be sent as it is; ``reason`` is one line for the operator."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class NotDicom(InvalidDicom):
    """Not a DICOM file (no DICM marker and no recognisable data set)."""


class Truncated(InvalidDicom):
    """The encoded lengths run past the end of the file: still being written, or cut short."""


class MissingUID(InvalidDicom):
    """SOP Class UID or SOP Instance UID is missing."""


class BadUID(InvalidDicom):
    """A Transfer Syntax, SOP Class or SOP Instance UID that no peer can be sent."""
