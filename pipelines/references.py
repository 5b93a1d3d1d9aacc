"""The eval-leak guard's reference images, read from where users keep eval sets.

- `folders`: every image file under the folder (recursively); its id is the path inside the folder.
- `coco`: a COCO instances file's `images[].file_name`, looked up in its image folder; the id is the file name.
- `crawled`: img2dataset's webdataset output of an eval set's URL list (`<shards>/*.tar`, re-crawl passes
  included); the id is img2dataset's key.

`check_references` runs before the crawl (a missing folder or file is one sentence there); `load_references`
runs in the guard's fit, and a reference file that cannot be read is reported, not fatal.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipelines.crawl import tar_images
from pipelines.url_list import file_sha256
from schemas.config import EvalGuardConfig
from schemas.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Reference:
    id: str
    data: bytes


def check_references(config: EvalGuardConfig) -> None:
    """Every configured source exists and has the shape its kind needs, before anything is crawled."""
    for folder in map(Path, config.folders):
        if not folder.is_dir():
            raise UserError(f"Eval-guard folder {folder} {_state(folder)}; set eval_guard.folders to folders of "
                            f"held-out images (or to []).")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*")):
            raise UserError(f"Eval-guard folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                            f"set eval_guard.folders to folders of held-out images (or to []).")
    for entry in config.coco:
        instances, images = Path(entry.instances), Path(entry.images)
        if not instances.is_file():
            raise UserError(f"Eval-guard COCO file {instances} {_state(instances)}; set eval_guard.coco[].instances to "
                            f"a COCO instances JSON.")
        if not images.is_dir():
            raise UserError(f"Eval-guard image folder {images} {_state(images)}; set eval_guard.coco[].images to the "
                            f"folder holding {instances.name}'s images.")
        _coco_file_names(instances)
    for shards in map(Path, config.crawled):
        if not shards.is_dir() or not any(shards.rglob("*.tar")):
            state = "holds no .tar shards" if shards.is_dir() else _state(shards)
            raise UserError(f"Eval-guard crawl output {shards} {state}; set eval_guard.crawled to img2dataset "
                            f"webdataset output folders (a run's shards/).")


def references_fingerprint(config: EvalGuardConfig) -> str:
    """What names the references for the version id: each file's path and size (an eval set changed in place
    makes a new version), the COCO files' bytes; sources that do not exist count as missing."""
    digest = hashlib.sha256()
    listed = [(Path(f), lambda p: p.suffix.lower() in IMAGE_SUFFIXES) for f in config.folders]
    listed += [(Path(c), lambda p: p.suffix == ".tar") for c in config.crawled]
    for entry in config.coco:
        instances = Path(entry.instances)
        content = file_sha256(instances) if instances.is_file() else "missing"
        digest.update(f"coco|{instances}|{content}|{entry.images}\n".encode())
    for root, wanted in listed:
        files = sorted(p for p in root.rglob("*") if p.is_file() and wanted(p)) if root.is_dir() else []
        digest.update(f"{root}|{len(files)}\n".encode())
        for path in files:
            digest.update(f"{path.relative_to(root)}|{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def load_references(config: EvalGuardConfig, problems: list[str]) -> Iterator[Reference]:
    """Every reference image, one at a time (an eval set need not fit in memory); each file that cannot be
    read adds a line to `problems` instead."""
    def read(ref_id: str, path: Path) -> Iterator[Reference]:
        try:
            yield Reference(ref_id, path.read_bytes())
        except OSError as err:
            problems.append(f"{path}: {err.strerror or err}")

    for folder in map(Path, config.folders):
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            yield from read(path.relative_to(folder).as_posix(), path)
    for entry in config.coco:
        for name in _coco_file_names(Path(entry.instances)):
            yield from read(name, Path(entry.images) / name)
    for shards in map(Path, config.crawled):
        for tar in sorted(shards.rglob("*.tar")):
            yield from _tar_references(tar, problems)


def _coco_file_names(instances: Path) -> list[str]:
    try:
        images = json.loads(instances.read_text(encoding="utf-8")).get("images")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise UserError(f"Eval-guard COCO file {instances} cannot be read as COCO instances JSON "
                        f"({str(err).splitlines()[0]}).") from None
    if not isinstance(images, list) or not all(isinstance(i, dict) and "file_name" in i for i in images):
        raise UserError(f"Eval-guard COCO file {instances} has no images list with file_name entries; pass an "
                        f"instances_*.json.")
    return [str(i["file_name"]) for i in images]


def _tar_references(path: Path, problems: list[str]) -> list[Reference]:
    try:
        return [Reference(key, data) for key, data in tar_images(path).items()]
    except (OSError, tarfile.TarError) as err:
        problems.append(f"{path}: {err}")
        return []


def _state(path: Path) -> str:
    return "does not exist" if not path.exists() else "is a directory" if path.is_dir() else "is a file"
