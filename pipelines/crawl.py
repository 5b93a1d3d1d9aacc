"""Stage 1: img2dataset turns the URL list into webdataset shards plus parquet status files.

img2dataset runs with our guarded downloader (`pipelines/fetch.py`: URL policy, deadline, byte
limit, retries). Images are stored exactly as downloaded (`disable_all_reencoding`): the validate
stage decodes them. When a run resumes, rows whose last failure was transient (timeouts, resets,
429, 5xx) are crawled again into `shards/recrawl-<n>/` (`crawl.recrawl_transient`). `read_shard`
turns one shard back into records — one per input row, its latest attempt winning — so every URL
ends with a status and a reason.
"""
from __future__ import annotations

import contextlib
import re
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.fetch import TRANSIENT_KINDS, FetchSettings
from schemas.config import CrawlConfig
from schemas.records import ImageRecord, reason_kind

STAGE = "crawl"
SHARD_DIGITS = 5  # img2dataset's oom_shard_count: shard files are 00000.tar, 00000.parquet, ...
RECRAWL = "recrawl-"  # shards/recrawl-1/, recrawl-2/ ...: one per resumed run that had transient failures


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
    """Crawls the shards not done yet; on a resumed run, then re-crawls the rows whose last failure was transient."""
    from pipelines.crawl_workers import guarded_img2dataset, light_spawn  # first: it keeps albumentations from phoning home

    from img2dataset import download

    resumed = shards_dir.is_dir() and any(shards_dir.glob("*_stats.json"))
    # A shard that fails after img2dataset's own retries is reported by read_shard, row by row.
    spawn = light_spawn() if distributor == "multiprocessing" else contextlib.nullcontext()
    with guarded_img2dataset(FetchSettings.from_config(config)), spawn:
        download(**img2dataset_arguments(config, url_list, shards_dir, distributor))
        if resumed and config.recrawl_transient:
            passes = recrawl_passes(shards_dir)
            if passes and not _finished(passes[-1]):  # an interrupted re-crawl resumes first
                download(**img2dataset_arguments(config, passes[-1] / "urls.parquet", passes[-1], distributor))
            transient = transient_rows(shards_dir)
            if transient:
                target = shards_dir / f"{RECRAWL}{len(passes) + 1}"
                target.mkdir()
                table = pa.Table.from_pylist(transient)
                pq.write_table(table, target / "urls.parquet", row_group_size=config.shard_size)
                print(f"re-crawling {len(transient)} rows whose last failure was transient into {target.name}/", flush=True)
                download(**img2dataset_arguments(config, target / "urls.parquet", target, distributor))


def recrawl_passes(shards_dir: Path) -> list[Path]:
    return sorted(shards_dir.glob(f"{RECRAWL}*"), key=lambda p: int(p.name.removeprefix(RECRAWL)))


def _finished(pass_dir: Path) -> bool:
    shards = pq.ParquetFile(pass_dir / "urls.parquet").num_row_groups
    return len(list(pass_dir.glob("*_stats.json"))) >= shards


def _is_transient(row: dict) -> bool:
    kind = reason_kind(classify_download_error(row.get("error_message"))).removeprefix("download_error:")
    return row["status"] != "success" and kind in TRANSIENT_KINDS


def _status_rows(directory: Path) -> list[dict]:
    rows = []
    for path in _status_files(directory):
        rows += [dict(row, _shard=path.with_suffix("")) for row in pq.read_table(path).to_pylist()]
    return rows


def _status_files(directory: Path) -> list[Path]:
    return [path for path in sorted(directory.glob("*.parquet")) if path.name != "urls.parquet"]


def _status_batches(directory: Path, columns: list[str]):
    """img2dataset's status rows of one pass as dicts of `columns`, a record batch at a time."""
    for path in _status_files(directory):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=columns):
            yield batch.to_pylist()


def transient_rows(shards_dir: Path) -> list[dict]:
    """{uid, url, caption} of the rows whose latest attempt failed transiently, pass by pass (a later attempt
    of a row replaces the earlier one); only those rows are held, never every row's status."""
    latest: dict[str, dict] = {}
    for directory in [shards_dir, *recrawl_passes(shards_dir)]:
        for rows in _status_batches(directory, ["uid", "url", "caption", "status", "error_message"]):
            for row in rows:
                if _is_transient(row):
                    latest[row["uid"]] = {k: row[k] for k in ("uid", "url", "caption")}
                else:
                    latest.pop(row["uid"], None)
    return list(latest.values())


def crawl_passes(shards_dir: Path) -> list[dict]:
    """Every attempt, pass by pass, for the manifest: URLs tried, successes, failure reasons (in one streamed
    pass over the status files)."""
    passes = []
    for directory in [shards_dir, *recrawl_passes(shards_dir)]:
        urls, success, reasons = 0, 0, Counter()
        for rows in _status_batches(directory, ["status", "error_message"]):
            urls += len(rows)
            success += sum(r["status"] == "success" for r in rows)
            reasons.update(reason_kind(classify_download_error(r["error_message"])) for r in rows if r["status"] != "success")
        passes.append({"pass": "crawl" if directory == shards_dir else directory.name, "urls": urls,
                       "success": success, "reasons": dict(sorted(reasons.items()))})
    return passes


def read_shard(shards_dir: Path, shard_id: int, url_list: Path) -> list[ImageRecord]:
    """All records of one shard, in input order; rows img2dataset never reported are dropped with a reason."""
    # prepare_url_list writes one row group per shard, so this reads only this shard's rows.
    expected = pq.ParquetFile(url_list).read_row_group(shard_id).to_pylist()
    stem = shards_dir / f"{shard_id:0{SHARD_DIGITS}d}"
    status = {}
    if stem.with_suffix(".parquet").exists():
        status = {row["uid"]: dict(row, _shard=stem) for row in pq.read_table(stem.with_suffix(".parquet")).to_pylist()}
    if passes := recrawl_passes(shards_dir):  # a later attempt of a row replaces the earlier one
        uids = {row["uid"] for row in expected}
        for directory in passes:
            status.update({row["uid"]: row for row in _status_rows(directory) if row["uid"] in uids})
    images: dict[Path, dict[str, bytes]] = {}
    records = []
    for row in expected:
        record = ImageRecord(uid=row["uid"], url=row["url"], caption=row["caption"], shard=shard_id)
        crawled = status.get(row["uid"])
        if crawled is None:
            records.append(record.dropped(STAGE, "crawl_error:shard did not finish; re-run to resume it"))
            continue
        if crawled["status"] == "success" and crawled["_shard"] not in images:
            images[crawled["_shard"]] = tar_images(crawled["_shard"].with_suffix(".tar"))
        image = images.get(crawled["_shard"], {}).get(crawled["key"])
        if crawled["status"] == "success" and image is not None:
            records.append(record.model_copy(update={"key": crawled["key"], "sha256": crawled["sha256"], "image": image}))
        else:
            record = record.model_copy(update={"key": crawled["key"]})
            records.append(record.dropped(STAGE, classify_download_error(crawled.get("error_message"))))
    return records


def tar_images(path: Path) -> dict[str, bytes]:
    """key -> image bytes of one img2dataset webdataset shard (its .txt and .json members left out)."""
    if not path.exists():
        return {}
    images = {}
    with tarfile.open(path) as archive:
        for member in archive:
            key, _, ext = member.name.rpartition(".")
            if ext not in ("txt", "json") and member.isfile():
                images[key] = archive.extractfile(member).read()
    return images


# img2dataset's urllib messages (shards crawled by the plain downloader, `--shards-from`).
_ERROR_CLASSES = (
    (re.compile(r"infinite loop|redirect", re.I), lambda m: "redirect_loop"),  # urllib: "HTTP Error 302: ... infinite loop"
    (re.compile(r"HTTP Error (\d{3})"), lambda m: f"http_{m.group(1)}"),
    (re.compile(r"timed out|timeout", re.I), lambda m: "timeout"),
    (re.compile(r"Connection refused", re.I), lambda m: "connection_refused"),
    (re.compile(r"Name or service not known|nodename nor servname|getaddrinfo", re.I), lambda m: "dns"),
    (re.compile(r"unknown url type|no host given", re.I), lambda m: "bad_url"),
)
# pipelines/fetch.py's messages: `<kind>[:<detail>]`, kept as they are.
_FETCH_MESSAGE = re.compile(r"^(blocked_scheme|blocked_address|too_large|deadline|incomplete_body|bad_url|timeout|"
                            r"http_\d{3}|redirect_loop|too_many_redirects|connection_refused|connection_reset|"
                            r"connection|dns|tls|disallowed)(:.*)?$")


def classify_download_error(message: str | None) -> str:
    """The downloader's error -> `download_error:<class>[:<text>]`."""
    text = (message or "no error message").splitlines()[0][:200]
    if _FETCH_MESSAGE.match(text):
        return f"download_error:{text}"
    for pattern, name in _ERROR_CLASSES:
        match = pattern.search(text)
        if match:
            return f"download_error:{name(match)}"
    return f"download_error:other:{text}"
