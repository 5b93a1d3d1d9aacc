"""The shape every keep/drop stage shares: `check` one record, `__call__` a batch."""
from __future__ import annotations

from schemas.records import ImageRecord, StageResult


class RecordFilter:
    """Subclasses set `name` and implement `check(record) -> (reason or None, record to keep)`."""

    name = "filter"

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
