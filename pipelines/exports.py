"""The formats users train with, written by `pipelines.publish` next to `hf/` and `llava/`:

  trl_sft/       DatasetDict {train, validation} (save_to_disk): `images` (one image) and `messages` with
                 content parts ({"type": "image"} / {"type": "text", "text": ...}), roles user / assistant:
                 what TRL's SFTTrainer takes for vision-language models.
  trl_dpo/       DatasetDict {train, validation}: `images`, `prompt` (the user turn), `chosen`, `rejected`
                 (one assistant turn each), `source`, `id`: grounding preference pairs for TRL's DPOTrainer.
  llamafactory/  {train,validation}.json (sharegpt: `messages` + `images`, paths relative to the folder)
                 and `dataset_info.json`, the entry LLaMA-Factory needs (`dataset_dir: <this folder>`).

Preference pairs come from what only this pipeline knows:
  probe:<kind>          every probe turn: chosen = its published answer (the program's label, or the teacher's
                        verified rewording), rejected = the same claim with the opposite label ("Yes, there is
                        a dog in the image." for an absent dog; "Yes, there are three cups ..." for two).
  verifier:<reason>     every rewording the grounding verifier rejected (an absent object asserted, a present
                        one denied, the label flipped ...): rejected = the teacher's answer, chosen = the
                        program's answer that replaced it.
A rejected turn of a conversation / detail / reasoning record has no grounded answer to prefer, so it
makes no pair; the card counts them.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from pipelines.disk_dataset import save_dataset_dict
from schemas.records import IMAGE_TOKEN

if TYPE_CHECKING:
    from pipelines.staged_rows import SplitRows

EXPORTS = ("trl_sft", "trl_dpo", "llamafactory")
ROLE = {"human": "user", "gpt": "assistant"}
SHARD_BYTES = 100 * 2**20


def _text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def _image_part() -> dict:
    return {"type": "image", "text": None}


def sft_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns -> chat messages with content parts; the image part where `<image>` stood."""
    messages = []
    for turn in conversations:
        text = turn["value"]
        parts = []
        if IMAGE_TOKEN in text:
            parts.append(_image_part())
            text = text.replace(f"{IMAGE_TOKEN}\n", "").replace(IMAGE_TOKEN, "")
        messages.append({"role": ROLE[turn["from"]], "content": parts + [_text_part(text)]})
    return messages


def opposite_answer(probe: dict) -> str:
    """The probe's claim with the opposite label, in the program's own phrasing."""
    from schemas.vocabulary import be, noun_phrase

    name, question = probe["category"], probe["question"]
    if probe["label"] == "yes":
        return f"No, there {be(name)} no {name} in the image."
    if probe["kind"] == "count":  # "Are there three cups in the image?" -> "Yes, there are three cups in the image."
        return f"Yes, there are {question.removeprefix('Are there ').removesuffix(' in the image?')} in the image."
    if probe["kind"] == "position":  # "Is the cup on the right side of the image?"
        side = "right" if " right " in question else "left"
        return f"Yes, the {name} {be(name)} on the {side} side of the image."
    return f"Yes, there {be(name)} {noun_phrase(name, 1)} in the image."


def _question(turn: dict) -> str:
    return turn["value"].replace(f"{IMAGE_TOKEN}\n", "").replace(IMAGE_TOKEN, "")


def dpo_pairs(row: dict, probes: list[dict], rejected_turns: list[dict]) -> list[dict]:
    """Preference pairs of one published `negatives` row (module docstring)."""
    if row["type"] != "negatives":
        return []
    turns = row["conversations"]
    answers = {_question(turns[i]): turns[i + 1]["value"] for i in range(0, len(turns) - 1, 2)}
    by_question = {p["question"]: p for p in probes}
    pairs = []

    def pair(question: str, chosen: str, rejected: str, source: str) -> None:
        pairs.append({"id": f"{row['id']}-{len(pairs)}", "uid": row["uid"], "source": source,
                      "prompt": [{"role": "user", "content": [_image_part(), _text_part(question)]}],
                      "chosen": [{"role": "assistant", "content": [_text_part(chosen)]}],
                      "rejected": [{"role": "assistant", "content": [_text_part(rejected)]}]})

    for question, answer in answers.items():
        if question in by_question:
            probe = by_question[question]
            pair(question, answer, opposite_answer(probe), f"probe:{probe['kind']}")
    for turn in rejected_turns:
        if turn["type"] == "negatives" and turn["question"] in answers:
            pair(turn["question"], answers[turn["question"]], turn["answer"], f"verifier:{turn['reason'].split(':')[0]}")
    return pairs


def _features(kind: str):
    import datasets

    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    message = {"role": datasets.Value("string"), "content": [part]}
    common = {"id": datasets.Value("string"), "images": datasets.Sequence(datasets.Image())}
    if kind == "trl_sft":
        return datasets.Features({**common, "messages": [message], "type": datasets.Value("string")})
    return datasets.Features({**common, "uid": datasets.Value("string"), "source": datasets.Value("string"),
                              "prompt": [message], "chosen": [message], "rejected": [message]})


def save_splits(rows_by_split: dict[str, SplitRows], features, out: Path, fill: Callable[[dict], dict],
                shape: Callable[[dict], list[dict]] = lambda row: [row]) -> dict[str, int]:
    """`out` as a DatasetDict (save_to_disk) of the rows `shape` makes of each published row (the row itself, a
    TRL message row, a record's preference pairs); returns rows per split. Each split goes through datasets'
    generator path: a row is shaped, and gets its image bytes from `fill` (read from llava/images), just before
    it is written, and the writer flushes to its cache file a batch at a time, so no split ever holds all its
    shaped rows or images in memory. `rows_by_split`: each split's rows (`SplitRows`), read for the emptiness
    check and the writing; the fingerprint reads their id column alone. The cache is a scratch folder
    beside `out`, removed after; the fingerprint is the split's published ids, so the same rows give the same
    files."""
    import datasets

    shutil.rmtree(out, ignore_errors=True)
    for stale in out.parent.glob(f".{out.name}-build-*"):  # left by a publish that was killed
        shutil.rmtree(stale, ignore_errors=True)
    splits = {}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-build-") as cache:
        for split, rows in rows_by_split.items():
            if not any(shape(row) for row in rows):  # the generator path cannot build an empty split
                splits[split] = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
                continue
            splits[split] = datasets.Dataset.from_generator(
                _filled, features=features, cache_dir=cache, split=split, fingerprint=_fingerprint(out.name, split, rows.column("id").to_pylist()),
                # `rows` is not a list: datasets treats a list in gen_kwargs as shards (a generator call per row)
                gen_kwargs={"rows": rows, "fill": fill, "shape": shape, "names": tuple(features)})
        # save_to_disk holds about a shard's worth of memory while it writes one: shards of SHARD_BYTES, not
        # datasets' default 500 MB, keep that small whatever the split's size (bench/publish.py); an empty
        # split still gets one shard, which load_from_disk needs.
        shards = {split: max(1, math.ceil(ds.data.nbytes / SHARD_BYTES)) for split, ds in splits.items()}
        save_dataset_dict(splits, out, shards)  # save_to_disk's files, the cache streamed rather than mapped
    return {split: len(ds) for split, ds in splits.items()}


def _fingerprint(name: str, split: str, ids: list[str]) -> str:
    """sha256 of json.dumps([name, split, ids]), hashed an id at a time."""
    digest = hashlib.sha256(json.dumps([name, split])[:-1].encode() + b", [")
    for i, row_id in enumerate(ids):
        digest.update((", " if i else "").encode() + json.dumps(row_id).encode())
    digest.update(b"]]")
    return digest.hexdigest()[:16]


def write_json_list(path: Path, entries: Iterable[dict]) -> None:
    """The bytes of json.dumps(list(entries), indent=1, ensure_ascii=False) + "\n", written an entry at a time."""
    with path.open("w") as file:
        written = False
        for entry in entries:
            file.write(("," if written else "[") + "\n " + json.dumps(entry, indent=1, ensure_ascii=False).replace("\n", "\n "))
            written = True
        file.write("\n]\n" if written else "[]\n")


def _filled(rows: Iterable[dict], fill: Callable[[dict], dict], shape: Callable[[dict], list[dict]], names: tuple[str, ...]):
    for source in rows:
        for row in shape(source):
            row = fill(row)
            yield {name: row[name] for name in names}


def llamafactory_entry(split: str) -> dict:
    return {"file_name": f"{split}.json", "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}


def write_exports(run_dir: Path, rows_by_split: dict[str, Iterable[dict]], image_paths: dict[str, str],
                  image: Callable[[str], dict], unpaired: int) -> dict:
    """Writes the three exports from the published rows (each a `negatives` row's `probes` and `rejected_turns`
    beside it); `image_paths`: uid -> the image's path under llava/, `image`: uid -> the HF image value (read when
    its row is written), `unpaired`: rejected turns that make no pair (counted by the caller). Returns rows per
    export and split, and pairs per source."""
    import datasets
    import pyarrow.compute as pc

    def sft_row(row: dict) -> list[dict]:
        return [{"id": row["id"], "uid": row["uid"], "messages": sft_messages(row["conversations"]), "type": row["type"]}]

    def pairs(row: dict) -> list[dict]:
        return dpo_pairs(row, json.loads(row.get("probes") or "[]"), json.loads(row.get("rejected_turns") or "[]"))

    with_image = lambda row: {**row, "images": [image(row["uid"])]}  # noqa: E731
    sft = save_splits(rows_by_split, _features("trl_sft"), run_dir / "trl_sft", with_image, sft_row)
    dpo = save_splits(rows_by_split, _features("trl_dpo"), run_dir / "trl_dpo", with_image, pairs)
    sources = Counter()  # what trl_dpo holds, counted from its source column (the pairs are not built again)
    for split in datasets.load_from_disk(str(run_dir / "trl_dpo")).values():
        for count in pc.value_counts(split.data.column("source")).to_pylist():
            sources[count["values"]] += count["counts"]

    folder = run_dir / "llamafactory"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    info = {}
    for split, rows in rows_by_split.items():
        write_json_list(folder / f"{split}.json", ({
            "messages": [{"role": ROLE[t["from"]], "content": t["value"]} for t in r["conversations"]],
            "images": [f"../llava/{image_paths[r['uid']]}"]} for r in rows))
        info[f"visinstruct_{split}"] = llamafactory_entry(split)
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return {"trl_sft": sft, "trl_dpo": dpo,
            "llamafactory": {s: len(r) for s, r in rows_by_split.items()},
            "dpo_sources": dict(sorted(sources.items())), "rejected_turns_without_pair": unpaired}
