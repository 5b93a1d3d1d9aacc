"""`save_dataset_dict` writes what `DatasetDict.save_to_disk` writes, byte for byte, streaming the generated
splits' cache files (several of them, as datasets cuts a large split) instead of reading them through their memory
map; `datasets.load_from_disk` reads the folder back with every row and image."""
from __future__ import annotations

import io

import datasets
from PIL import Image

from pipelines.disk_dataset import save_dataset_dict

FEATURES = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                              "turns": [{"from": datasets.Value("string"), "value": datasets.Value("string")}]})


def png(i: int) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((48, 40), 30 + i).convert("RGB").save(out, "PNG")  # noise: every image its own size
    return out.getvalue()


def rows(n: int, offset: int):
    for i in range(offset, offset + n):
        yield {"id": f"r{i:03d}", "image": {"bytes": png(i), "path": None},
               "turns": [{"from": "human", "value": f"<image>\nQ{i}"}, {"from": "gpt", "value": "A" * (i % 7)}]}


def test_the_streamed_folder_is_save_to_disks_byte_for_byte_and_loads(tmp_path, monkeypatch):
    # datasets flushes 100 image rows at a time and starts a new cache file past MAX_SHARD_SIZE: 3 files here
    monkeypatch.setattr(datasets.config, "MAX_SHARD_SIZE", 20_000)
    splits = {name: datasets.Dataset.from_generator(rows, features=FEATURES, cache_dir=str(tmp_path / "cache"),
                                                    split=name, gen_kwargs={"n": n, "offset": offset})
              for name, n, offset in (("train", 250, 0), ("validation", 5, 100))}
    splits["empty"] = datasets.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)
    assert len(splits["train"].cache_files) > 1  # the case at scale: a split in several files
    shards = {"train": 4, "validation": 1, "empty": 1}

    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "by_datasets"), num_shards=shards)
    save_dataset_dict(splits, tmp_path / "streamed", shards)

    expected = {p.relative_to(tmp_path / "by_datasets"): p.read_bytes() for p in (tmp_path / "by_datasets").rglob("*") if p.is_file()}
    got = {p.relative_to(tmp_path / "streamed"): p.read_bytes() for p in (tmp_path / "streamed").rglob("*") if p.is_file()}
    assert sorted(got) == sorted(expected) and len([p for p in got if p.suffix == ".arrow"]) == 6
    assert [str(p) for p in got if got[p] != expected[p]] == []

    loaded = datasets.load_from_disk(str(tmp_path / "streamed"))
    assert {name: len(split) for name, split in loaded.items()} == {"train": 250, "validation": 5, "empty": 0}
    assert loaded["train"][249]["id"] == "r249" and loaded["train"][249]["image"].size == (48, 40)
    assert loaded["validation"]["id"] == [f"r{i}" for i in range(100, 105)]
