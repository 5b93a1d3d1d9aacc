"""The shape every keep/drop stage shares: `check` one record, `__call__` a batch."""
from __future__ import annotations

from schemas.records import ImageRecord, StageResult


class RecordFilter:
    """Subclasses set `name` and implement `check(record) -> (reason or None, record to keep)`."""

    name = "filter"
    # The record fields the stage reads or sets, besides uid, url, status, reason and stage: the engines build
    # its records from these columns only (pipelines/batches.py); None: every field.
    columns: tuple[str, ...] | None = None

    def check(self, record: ImageRecord) -> tuple[str | None, ImageRecord]:
        raise NotImplementedError

    def __call__(self, records: list[ImageRecord]) -> StageResult:
        result = StageResult()
        for record in records:
            reason, checked = self.check(record)
            if reason is None:
                result.kept.append(checked)
            else:
                result.dropped.append(record.dropped(self.name, reason))
        return result
