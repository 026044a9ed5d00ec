"""Routing rules: which destinations want an instance, from its header attributes and path."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from forwarder.config import Settings
from forwarder.rulekeys import PATH_KEY, rule_tag

__all__ = ["Decision", "Filter", "Router", "Rule", "path_pattern"]

Unmatched = Literal["quarantine", "dispose"]
_NO_FACTS: Mapping[str, str] = {}
Globs = str | Sequence[str]


def path_pattern(glob: str) -> str:
    """A path glob as a regular expression: ``*`` and ``?`` stay within one folder name,
    ``**`` spans folders (``a/**/b`` also matches ``a/b``), ``[...]`` is a class as in
    fnmatch."""
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        ch = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif ch == "*":
            out.append("[^/]*")
            i += 1
        elif ch == "?":
            out.append("[^/]")
            i += 1
        elif ch == "[" and (end := glob.find("]", i + 2)) != -1:
            # fnmatch's own translation of one class
            out.append(fnmatch.translate(glob[i : end + 1])[4:-3])
            i = end + 1
        else:
            out.append(re.escape(ch))
            i += 1
    return "(?s:" + "".join(out) + r")\Z"


def _shown(globs: tuple[str, ...]) -> str:
    return repr(globs[0]) if len(globs) == 1 else repr(list(globs))


@dataclass(frozen=True)
class Rule:
    """One rule key (a keyword, a tag, ``path`` or a received instance's ``calling_aet``,
    ``called_aet``, ``peer``) and its globs, compiled."""

    key: str
    tag: int | None  # None: a reserved key (the relative path, or a fact of the association)
    globs: tuple[str, ...]
    pattern: re.Pattern[str] = field(compare=False)

    @classmethod
    def of(cls, key: str, globs: Globs) -> Rule:
        """Raises ValueError for a key that names no routable attribute."""
        items = (globs,) if isinstance(globs, str) else tuple(globs)
        tag = rule_tag(key)
        # case-sensitive, as DICOM values are (fnmatch.fnmatchcase)
        translate = path_pattern if key == PATH_KEY else fnmatch.translate
        pattern = re.compile("|".join(translate(g) for g in items))
        return cls(key, tag, items, pattern)

    def values(
        self,
        attributes: Mapping[int, tuple[str, ...]],
        relpath: str,
        facts: Mapping[str, str] = _NO_FACTS,
    ) -> tuple[str, ...]:
        """The values this rule looks at; empty when the file lacks the attribute (or, for
        ``calling_aet``, ``called_aet`` and ``peer``, when it was not received over DICOM)."""
        if self.tag is not None:
            return attributes.get(self.tag, ())
        if self.key == PATH_KEY:
            return (relpath,)
        fact = facts.get(self.key)
        return () if fact is None else (fact,)

    def hit(self, values: tuple[str, ...]) -> str | None:
        """The first value a glob matches, or None."""
        for value in values:
            if self.pattern.match(value):
                return value
        return None

    def shown(self, values: tuple[str, ...]) -> str:
        return repr("\\".join(values))


@dataclass(frozen=True)
class Filter:
    """The rules of one destination: every `match` rule must match, no `exclude` rule may."""

    destination: str
    match: tuple[Rule, ...] = ()
    exclude: tuple[Rule, ...] = ()

    def why_not(
        self,
        attributes: Mapping[int, tuple[str, ...]],
        relpath: str,
        facts: Mapping[str, str] = _NO_FACTS,
    ) -> str | None:
        """None when the destination wants the instance, else the first rule that failed."""
        for rule in self.match:
            values = rule.values(attributes, relpath, facts)
            if not values:
                return f"{rule.key} is absent (match {_shown(rule.globs)})"
            if rule.hit(values) is None:
                return f"{rule.key} {rule.shown(values)} does not match {_shown(rule.globs)}"
        for rule in self.exclude:
            values = rule.values(attributes, relpath, facts)
            hit = rule.hit(values)
            if hit is not None:
                return f"{rule.key} {rule.shown(values)} is excluded by {_shown(rule.globs)}"
        return None


@dataclass(frozen=True)
class Decision:
    """The destinations that want an instance; for each other, the first rule that failed."""

    destinations: tuple[str, ...]
    why_not: Mapping[str, str]


@dataclass(frozen=True)
class Router:
    """Every destination's rules, compiled once per configuration."""

    filters: tuple[Filter, ...]
    unmatched: Unmatched = "quarantine"
    tags: frozenset[int] = field(init=False)  # the attributes `inspect` must read
    _everyone: Decision | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rules = [r for f in self.filters for r in f.match + f.exclude]
        object.__setattr__(self, "tags", frozenset(r.tag for r in rules if r.tag is not None))
        # no rules anywhere: every instance goes everywhere, decided without looking
        everyone = Decision(tuple(f.destination for f in self.filters), {}) if not rules else None
        object.__setattr__(self, "_everyone", everyone)

    @classmethod
    def of(cls, settings: Settings) -> Router:
        """The router of validated `settings` (their rule keys and globs are known good)."""
        return cls.build(
            [(d.name, d.match, d.exclude) for d in settings.destinations],
            settings.routing.unmatched,
        )

    @classmethod
    def build(
        cls,
        destinations: Sequence[tuple[str, Mapping[str, Globs], Mapping[str, Globs]]],
        unmatched: Unmatched = "quarantine",
    ) -> Router:
        """A router from (name, match, exclude) per destination; ValueError for a bad key."""
        filters = tuple(
            Filter(
                name,
                tuple(Rule.of(k, g) for k, g in match.items()),
                tuple(Rule.of(k, g) for k, g in exclude.items()),
            )
            for name, match, exclude in destinations
        )
        return cls(filters, unmatched)

    @property
    def has_rules(self) -> bool:
        return self._everyone is None

    def route(
        self,
        attributes: Mapping[int, tuple[str, ...]],
        relpath: str,
        facts: Mapping[str, str] = _NO_FACTS,
    ) -> Decision:
        """Which destinations want the instance with these header `attributes` (as
        ``DicomInfo.attributes``) at `relpath` (relative to its watched folder, ``/``-separated);
        `facts`: ``calling_aet``, ``called_aet`` and ``peer`` of an instance received over
        DICOM (none for a watched file)."""
        if self._everyone is not None:
            return self._everyone
        wanted: list[str] = []
        why_not: dict[str, str] = {}
        for f in self.filters:
            reason = f.why_not(attributes, relpath, facts)
            if reason is None:
                wanted.append(f.destination)
            else:
                why_not[f.destination] = reason
        return Decision(tuple(wanted), why_not)
