"""Per-destination transforms: the settings record and their checks (placeholder: the helper's
version replaces this file)."""

from __future__ import annotations

from dataclasses import dataclass

SYNTAXES: dict[str, str | None] = {
    "keep": None,
    "explicit-le": "1.2.840.10008.1.2.1",
    "implicit-le": "1.2.840.10008.1.2",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg-ls-lossless": "1.2.840.10008.1.2.4.80",
    "jpeg2000-lossless": "1.2.840.10008.1.2.4.90",
}
DEIDENTIFY = ("none", "basic")


@dataclass(frozen=True)
class TransformSpec:
    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()
    deidentify: str = "none"
    transfer_syntax: str = "keep"
    allow_burned_in: bool = False

    @property
    def changes_nothing(self) -> bool:
        return (
            not self.set
            and not self.remove
            and self.deidentify == "none"
            and self.transfer_syntax == "keep"
        )


def check_set_key(key: str) -> str:
    return key


def check_remove_key(key: str) -> str:
    return key


def check_template(template: str) -> str:
    return template


class TransformFailed(Exception):
    """The transform cannot take this instance; the message is the one-line reason."""
