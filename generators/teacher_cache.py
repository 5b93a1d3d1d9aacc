"""On-disk cache of teacher answers, so a resumed or repeated run pays for no call twice.

The key is a hash of (model, prompt version, messages, sampling parameters, output schema): anything
that could change the answer. One small JSON file per key under `<dir>/<2 hex>/<key>.json`, written
to a temporary name and renamed, so concurrent workers (and nodes on a shared file system) never
read a half-written entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_key(model: str, prompt_version: str, messages: list[dict], sampling: dict, schema: dict) -> str:
    payload = {"model": model, "prompt_version": prompt_version, "messages": messages,
               "sampling": sampling, "schema": schema}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class TeacherCache:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(key).read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # absent, or a foreign partial file: ask again
            return None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, ensure_ascii=False)
        os.replace(tmp, path)
