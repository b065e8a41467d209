"""Anonymization: the contract between the autoloader and the rule engine.

The autoloader calls ``anonymizer.anonymize(dataset)`` on every instance before it is indexed and
archived. An anonymizer returns the anonymized dataset and the rule set version that produced it,
or raises :class:`AnonymizationRefused` when the instance must go to quarantine instead (a rule
that fails on it, residual identifying data, burned-in annotation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pydicom.dataset import Dataset


@dataclass(frozen=True)
class AnonymizationResult:
    dataset: Dataset
    #: Primary key of the RuleSet row that anonymized the instance; None for pass-through.
    ruleset_version: int | None


class AnonymizationRefused(Exception):
    """The instance must not be archived; ``reason`` names the quarantine folder."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Anonymizer(Protocol):
    def anonymize(self, dataset: Dataset) -> AnonymizationResult: ...


class PassThrough:
    """Leaves data unchanged: used until the rule engine is wired in."""

    def anonymize(self, dataset: Dataset) -> AnonymizationResult:
        return AnonymizationResult(dataset=dataset, ruleset_version=None)
