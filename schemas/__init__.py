"""Typed records and configs that cross every stage boundary (pydantic + stdlib only)."""
from schemas.errors import UserError
from schemas.records import DROP, KEEP, ImageRecord, ObjectAnnotation, StageResult, reason_kind

__all__ = ["DROP", "KEEP", "ImageRecord", "ObjectAnnotation", "StageResult", "UserError", "reason_kind"]
