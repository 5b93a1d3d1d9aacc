"""Stage 1: img2dataset turns the URL list into webdataset shards plus parquet status files.

Images are stored exactly as downloaded (`disable_all_reencoding`): the validate stage decodes
them. `read_shard` turns one shard back into records — one per input row, whatever happened
to it — so every URL ends with a status and a reason.
"""
from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import pyarrow.parquet as pq

from schemas.config import CrawlConfig
from schemas.records import ImageRecord

STAGE = "crawl"
SHARD_DIGITS = 5  # img2dataset's oom_shard_count: shard files are 00000.tar, 00000.parquet, ...


def img2dataset_arguments(config: CrawlConfig, url_list: Path, shards_dir: Path, distributor: str) -> dict:
    """The keyword arguments of `img2dataset.download`; also used by the benchmark for the plain CLI."""
    return dict(
        url_list=str(url_list),
        output_folder=str(shards_dir),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["uid"],
        output_format="webdataset",
        resize_mode="no",
        disable_all_reencoding=True,  # keep bytes as served; decoding is validate's job
        compute_hash="sha256",
        extract_exif=False,
        timeout=config.timeout,
        retries=config.retries,
        processes_count=config.processes,
        thread_count=config.threads,
        number_sample_per_shard=config.shard_size,
        oom_shard_count=SHARD_DIGITS,
        distributor=distributor,
        incremental_mode="incremental",  # a re-run only downloads shards that did not finish
        enable_wandb=False,
        disallowed_header_directives=[],
    )


def crawl(config: CrawlConfig, url_list: Path, shards_dir: Path, distributor: str = "multiprocessing") -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which phones home
    from img2dataset import download

    # A shard that fails after img2dataset's own retries is reported by read_shard, row by row.
    download(**img2dataset_arguments(config, url_list, shards_dir, distributor))


def read_shard(shards_dir: Path, shard_id: int, url_list: Path) -> list[ImageRecord]:
    """All records of one shard, in input order; rows img2dataset never reported are dropped with a reason."""
    # prepare_url_list writes one row group per shard, so this reads only this shard's rows.
    expected = pq.ParquetFile(url_list).read_row_group(shard_id).to_pylist()
    stem = shards_dir / f"{shard_id:0{SHARD_DIGITS}d}"
    status = {}
    if stem.with_suffix(".parquet").exists():
        status = {row["uid"]: row for row in pq.read_table(stem.with_suffix(".parquet")).to_pylist()}
    images = _tar_images(stem.with_suffix(".tar"))
    records = []
    for row in expected:
        record = ImageRecord(uid=row["uid"], url=row["url"], caption=row["caption"])
        crawled = status.get(row["uid"])
        if crawled is None:
            records.append(record.dropped(STAGE, "crawl_error:shard did not finish; re-run to resume it"))
        elif crawled["status"] == "success" and crawled["key"] in images:
            records.append(record.model_copy(update={"key": crawled["key"], "sha256": crawled["sha256"], "image": images[crawled["key"]]}))
        else:
            record = record.model_copy(update={"key": crawled["key"]})
            records.append(record.dropped(STAGE, classify_download_error(crawled.get("error_message"))))
    return records


def _tar_images(path: Path) -> dict[str, bytes]:
    if not path.exists():
        return {}
    images = {}
    with tarfile.open(path) as archive:
        for member in archive:
            key, _, ext = member.name.rpartition(".")
            if ext not in ("txt", "json") and member.isfile():
                images[key] = archive.extractfile(member).read()
    return images


_ERROR_CLASSES = (
    (re.compile(r"infinite loop|redirect", re.I), lambda m: "redirect_loop"),  # urllib: "HTTP Error 302: ... infinite loop"
    (re.compile(r"HTTP Error (\d{3})"), lambda m: f"http_{m.group(1)}"),
    (re.compile(r"timed out|timeout", re.I), lambda m: "timeout"),
    (re.compile(r"Connection refused", re.I), lambda m: "connection_refused"),
    (re.compile(r"Name or service not known|nodename nor servname|getaddrinfo", re.I), lambda m: "dns"),
    (re.compile(r"unknown url type|no host given", re.I), lambda m: "bad_url"),
)


def classify_download_error(message: str | None) -> str:
    """img2dataset's free-text error -> `download_error:<class>[:<text>]`."""
    text = (message or "no error message").splitlines()[0][:200]
    for pattern, name in _ERROR_CLASSES:
        match = pattern.search(text)
        if match:
            return f"download_error:{name(match)}"
    return f"download_error:other:{text}"
