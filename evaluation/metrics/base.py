"""The metric record and the name registry shared by every benchmark (no benchmark code here).

A :class:`Metric` carries its direction and both levels of scoring, as lighteval's ``Metric`` does: a per-sample
function and a corpus-level aggregate. :class:`Registry` rejects duplicate names and answers a miss with
"did you mean ...?" and the full list, as lm-evaluation-harness ``api/registry.py`` does.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class SampleFn(Protocol):
    """``sample_fn(prediction, references, **record_fields) -> float``: one sample's score (usually in [0, 1]).

    ``references`` is the record's answer(s); record fields a metric does not use (e.g. ``all_classes``) are
    passed as keywords and ignored.
    """

    def __call__(self, prediction: str, references: str | Sequence[str], **record_fields: object) -> float: ...


class AggregateFn(Protocol):
    """``aggregate_fn(sample_scores, groups=None) -> float``: a corpus score from the per-sample scores.

    ``groups`` gives a group id per sample (AIME problem ids, for avg@k and pass@k); other metrics ignore it.
    """

    def __call__(self, sample_scores: Sequence[float], groups: Sequence[Hashable] | None = None) -> float: ...


@dataclass(frozen=True)
class Metric:
    """A registered metric: per-sample function, corpus aggregate, direction and version.

    Instances are immutable and hold only functions, so one shared instance per name is safe. Bump ``version``
    whenever a change can move a number, so stored results say which rule produced them.
    """

    name: str
    sample_fn: SampleFn
    aggregate_fn: AggregateFn
    higher_is_better: bool = True
    version: str = "1"


def unknown_name_error(kind: str, name: str, choices: Sequence[str]) -> ValueError:
    """A one-line ``ValueError`` for a name not in ``choices``: close matches first, then every valid name."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return ValueError(f"unknown {kind} {name!r}: {hint}choose from {', '.join(sorted(choices))}")


class Registry(Generic[T]):
    """Names to entries of one type. Duplicate names and entries of the wrong type are rejected."""

    def __init__(self, kind: str, entry_type: type[T]) -> None:
        self.kind = kind
        self.entry_type = entry_type
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name`` and return it; a name can be registered once only."""
        if not isinstance(entry, self.entry_type):
            raise TypeError(f"a {self.kind} registry entry must be a {self.entry_type.__name__}, got {entry!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry registered under ``name``, or a ``ValueError`` that suggests close names."""
        if name in self._entries:
            return self._entries[name]
        raise unknown_name_error(self.kind, name, list(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def ignore_groups(aggregate: Callable[[Sequence[float]], float]) -> AggregateFn:
    """Adapt a reference aggregate that takes only the scores to the :class:`AggregateFn` call."""

    def aggregate_fn(sample_scores: Sequence[float], groups: Sequence[Hashable] | None = None) -> float:
        return aggregate(sample_scores)

    aggregate_fn.__name__ = aggregate_fn.__qualname__ = aggregate.__name__
    aggregate_fn.__doc__ = aggregate.__doc__
    return aggregate_fn
