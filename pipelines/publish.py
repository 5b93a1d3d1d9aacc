"""Publishes a finished run's instruction data: a Hugging Face dataset, a LLaVA-format export, and
(optionally) a push to the Hub tagged with the run's version.

    python -m pipelines.publish outputs/sample/v-<hash> [--push user/dataset]

Writes, inside the run directory:
  hf/                      DatasetDict {train, validation} (save_to_disk); one row per LLaVA record
  llava/{train,validation}.json, llava/images/<uid>.<ext>   what LLaVA's training scripts read
  trl_sft/, trl_dpo/, llamafactory/   TRL SFT rows, TRL DPO grounding-preference pairs, LLaMA-Factory
                           sharegpt files (pipelines/exports.py)
  push.json                the last Hub push: status, repo, tag URL or the error sentence, attempts (never the
                           token); a version whose push failed is pushed again by the next run of its config
Both keep each record's provenance as JSON text (a `negatives` record's `probe_labels` / `probe_kinds`
align with its turns: a "without negatives" set drops the turns labelled "no").
The split is by image (every record of an image lands in the same split), decided by a hash of
(seed, uid), so it does not move when other images come or go. Rows are sorted by id, so the same
records give byte-identical files however the record shards were cut.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import typing
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.exports import save_splits, write_exports, write_json_list
from pipelines.staged_rows import SplitRows, rows_by_split, stage_rows
from schemas.errors import UserError
from schemas.records import PublishedRow, stored_type

SPLITS = ("train", "validation")
RECORD_COLUMNS = ["uid", "caption", "image", "clip_score", "objects", "instructions"]
PUSH_RECORD = "push.json"
_MAGIC = {b"\xff\xd8\xff": "jpg", b"\x89PNG\r\n\x1a\n": "png", b"GIF87a": "gif", b"GIF89a": "gif"}


def hf_features():
    """The published dataset's features, from `PublishedRow`."""
    import datasets

    def feature(field):
        if (field.json_schema_extra or {}).get("hf") == "image":
            return datasets.Image()  # stored as the crawled bytes; decodes to PIL on access
        kind = stored_type(field.annotation)
        if typing.get_origin(kind) is list:
            return [feature_of(typing.get_args(kind)[0])]
        return datasets.Value({str: "string", int: "int32", float: "float32", bool: "bool"}[kind])

    def feature_of(model):
        return {field.alias or name: feature(field) for name, field in model.model_fields.items()}

    return datasets.Features(feature_of(PublishedRow))


def split_of(uid: str, seed: int, validation_fraction: float) -> str:
    """'validation' when sha256(seed:uid), read as a number in [0, 1), falls below the fraction."""
    digest = hashlib.sha256(f"{seed}:{uid}".encode()).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction else "train"


def image_extension(data: bytes) -> str:
    """The file extension the bytes' format calls for (magic bytes; Pillow names anything rarer)."""
    for magic, ext in _MAGIC.items():
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return (image.format or "bin").lower()


def record_files(records_dir: Path) -> list[Path]:
    """The record shards, checked to hold what publishing reads."""
    files = sorted(records_dir.glob("*.parquet")) if records_dir.exists() else []
    if not files:
        raise UserError(f"{records_dir} holds no record files; publish a finished run's directory.")
    missing = [c for c in RECORD_COLUMNS if c not in pq.read_schema(files[0]).names]
    if missing:
        raise UserError(f"{records_dir} has no {', '.join(missing)} column; run the generate stage before publishing.")
    return files


def write_images(files: list[Path], uids: set[str], out: Path) -> dict[str, str]:
    """Each published image written once to `out/images/<uid>.<ext>`, streamed from the record `files` (parquet
    decodes one row group at a time: never every image in memory); returns uid -> its path under `out`."""
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    names: dict[str, str] = {}
    for path in files:
        for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=64, columns=["uid", "image"]):
            for uid, image in zip(batch.column("uid").to_pylist(), batch.column("image")):
                if uid in uids and uid not in names:
                    data = image.as_py()
                    names[uid] = f"images/{uid}.{image_extension(data)}"
                    (out / names[uid]).write_bytes(data)
    return names


def write_llava(rows_by_split: dict[str, SplitRows], out: Path, names: dict[str, str]) -> None:
    """llava/{split}.json next to the images `write_images` put there."""
    for split, rows in rows_by_split.items():
        write_json_list(out / f"{split}.json", ({"id": row["id"], "image": names[row["uid"]], "conversations":
                                                 row["conversations"], "provenance": row["provenance"]}
                                                for row in rows))  # extra keys are ignored by LLaVA's loader


def publish_dataset(run_dir: Path, validation_fraction: float = 0.05, seed: int = 0) -> dict:
    """Writes `run_dir/llava`, `run_dir/hf` and the exports from `run_dir/records`; returns records and images
    per split and records per type. The records are read once into staged rows (a scratch Arrow file, removed
    after), images go from the record shards to llava/images in one streamed pass, and every dataset then reads
    its rows a chunk at a time in id order, and each image from llava/images as its row is written."""
    run_dir = Path(run_dir)
    files = record_files(run_dir / "records")
    for stale in run_dir.glob(".publish-*"):  # left by a publish that was killed
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".publish-") as scratch:
        staged = Path(scratch) / "rows.arrow"
        names = pq.read_schema(files[0]).names
        columns = [c for c in RECORD_COLUMNS if c != "image"] + [c for c in ("probes", "rejected_turns") if c in names]
        unpaired = stage_rows(run_dir / "records", columns, staged, lambda uid: split_of(uid, seed, validation_fraction))
        with pa.memory_map(str(staged)) as source:
            table = pa.ipc.open_file(source).read_all()
            splits = rows_by_split(table, run_dir / "records", SPLITS)
            llava = run_dir / "llava"
            image_paths = write_images(files, set(table.column("uid").to_pylist()), llava)
            write_llava(splits, llava, image_paths)

            def image(uid: str) -> dict:
                return {"bytes": (llava / image_paths[uid]).read_bytes(), "path": None}

            save_splits(splits, hf_features(), run_dir / "hf", lambda row: {**row, "image": image(row["uid"])})
            counts: dict = {split: {"records": len(rows), "images": pc.count_distinct(rows.column("uid")).as_py()}
                            for split, rows in splits.items()}
            types = pc.value_counts(table.column("type")).to_pylist()
            counts["by_type"] = dict(sorted((t["values"], t["counts"]) for t in types))
            counts["exports"] = write_exports(run_dir, splits, image_paths, image, unpaired)
            del table, splits  # the memory map closes with no array left on it
    return counts


def push_to_hub(run_dir: Path, repo_id: str, version: str, token_env: str = "HF_TOKEN", private: bool = True) -> str:
    """Uploads the card, then `hf/` (push_to_hub adds its dataset_info to the card), and tags the commit
    with `version`; returns the tag's URL. The token is read from the environment and never shown."""
    token = os.environ.get(token_env)
    if not token:
        raise UserError(f"Set {token_env} to a Hugging Face write token to push to {repo_id}, or turn the push off.")
    run_dir = Path(run_dir)
    if not (run_dir / "hf" / "dataset_dict.json").is_file():
        raise UserError(f"{run_dir / 'hf'} does not exist; publish the dataset before pushing it.")
    import datasets
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True, token=token)
        for name in ("README.md", "examples.png"):
            if (run_dir / name).is_file():
                api.upload_file(path_or_fileobj=str(run_dir / name), path_in_repo=name, repo_id=repo_id,
                                repo_type="dataset", token=token)
        datasets.load_from_disk(str(run_dir / "hf")).push_to_hub(repo_id, token=token, private=private)
        api.create_tag(repo_id, tag=version, repo_type="dataset", token=token, exist_ok=True)
        return f"https://huggingface.co/datasets/{repo_id}/tree/{version}"
    except Exception as err:  # HTTP errors are requests', httpx's or HfHubHTTPError by hub version: all one sentence
        reason = (str(err).splitlines() or [type(err).__name__])[0].replace(token, "***")
    # Raised outside the handler so that no chained exception carries the token along.
    raise UserError(f"Pushing to {repo_id} failed ({reason}); check {token_env} and the repo name.")


def push_record(run_dir: Path) -> dict:
    """The version's last push (empty when it was never pushed, or the record is unreadable: push again)."""
    try:
        return json.loads((Path(run_dir) / PUSH_RECORD).read_text())
    except (OSError, ValueError):
        return {}


def push_version(run_dir: Path, repo_id: str, version: str, token_env: str = "HF_TOKEN") -> str:
    """push_to_hub, its outcome recorded in `run_dir/push.json`, so that a failed push is retried by the next
    run rather than forgotten; returns the tag's URL. The record holds the error sentence, never the token."""
    run_dir = Path(run_dir)
    attempt = {"repo": repo_id, "version": version, "attempts": push_record(run_dir).get("attempts", 0) + 1,
               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        url = push_to_hub(run_dir, repo_id, version, token_env)
    except UserError as err:
        _write_push_record(run_dir, {**attempt, "status": "failed", "error": str(err)})
        raise UserError(f"{str(err).rstrip('.')} (recorded in {run_dir / PUSH_RECORD}; running the same command "
                        f"again retries the push).") from None
    _write_push_record(run_dir, {**attempt, "status": "pushed", "tag_url": url})
    return url


def _write_push_record(run_dir: Path, record: dict) -> None:
    partial = run_dir / (PUSH_RECORD + ".partial")  # renamed into place: a record is never half written
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.rename(run_dir / PUSH_RECORD)


def main() -> None:
    from pipelines.dataset_card import write_dataset_card

    p = argparse.ArgumentParser(description="Publish a finished run: hf/, llava/, README.md card, optional Hub push. "
                                            "A version published already is never re-split or overwritten.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--validation-fraction", type=float, default=None, help="default: the run's own (only for a run "
                                                                           "not published yet)")
    p.add_argument("--push", metavar="REPO_ID", help="push to this Hub dataset repo (token from the run's "
                                                     "publish.token_env, HF_TOKEN by default)")
    args = p.parse_args()
    manifest_path = args.run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path} does not exist; publish a finished run's directory.")
    manifest = json.loads(manifest_path.read_text())
    config = manifest.get("config", {})
    publish = config.get("publish", {})
    if (args.run_dir / "hf").is_dir() and (args.run_dir / "llava").is_dir():
        if args.validation_fraction is not None:
            raise UserError(f"{args.run_dir} is published already and a version is never overwritten; for another "
                            f"split, run the pipeline with --set publish.validation_fraction={args.validation_fraction} "
                            f"(a new version).")
        print(f"{args.run_dir} is published already (hf/, llava/); leaving it as it is.")
    else:
        # The run's own split, so that a late publish (or a retried push) ships the split the run made.
        fraction = publish.get("validation_fraction", 0.05) if args.validation_fraction is None else args.validation_fraction
        counts = publish_dataset(args.run_dir, fraction, config.get("teacher", {}).get("seed", 0))
        print(f"published {json.dumps(counts)} -> {args.run_dir / 'hf'}, {args.run_dir / 'llava'}")
        print(f"card: {write_dataset_card(args.run_dir, manifest, counts)}")
    if args.push:
        url = push_version(args.run_dir, args.push, manifest["version"], publish.get("token_env", "HF_TOKEN"))
        print(f"pushed: {url}")


if __name__ == "__main__":
    from schemas.errors import exit_on_user_error

    exit_on_user_error(main)
