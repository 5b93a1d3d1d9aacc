"""The Hugging Face dataset card of a published run: `run_dir/README.md` and `run_dir/examples.png`.

Written after `pipelines.publish.publish_dataset` (it reads `llava/` for examples and `records/` for
CLIP scores); `python -m pipelines.publish RUN_DIR` runs both. Nothing secret reaches the card: config
fields named like keys, tokens or passwords are left out, and secret-looking values are redacted.
"""
from __future__ import annotations

import json
import os
import re
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from evals.noise_eval import iter_rows

_SECRET_PARTS = {"key", "apikey", "token", "password", "passwd", "secret", "credential", "credentials"}
# OpenAI / Hugging Face / GitHub tokens, and user:password@ in URLs.
_SECRET_VALUE = re.compile(r"\b(?:sk-[\w-]{8,}|hf_\w{8,}|gh[pousr]_\w{8,})|(?<=://)[^/\s:@]+:[^/\s@]+@")
REDACTED = "[redacted]"
_BETWEEN_ITEMS = re.compile(r"[\s,]*")  # whitespace and the commas between a JSON list's items
GRID, CELL, TEXT_H = 3, 200, 96  # 3x3 thumbnails of 200 px, with 96 px of question/answer under each


def is_secret_name(name: str) -> bool:
    """`api_key`, `hf_token`, `password` are; `api_key_env` (the NAME of a variable) and `max_tokens` are not."""
    parts = re.split(r"[_.\-]", str(name).lower())
    return parts[-1] != "env" and bool(_SECRET_PARTS & set(parts))


def redact(tree):
    """The tree without secret-named fields, and with secret-looking strings replaced."""
    if isinstance(tree, dict):
        return {k: redact(v) for k, v in tree.items() if not is_secret_name(k)}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    if isinstance(tree, str) and _SECRET_VALUE.search(tree):
        return REDACTED
    return tree


def _secret_values(tree, env_names: set[str]) -> set[str]:
    """Values under secret names anywhere in `tree`; collects the env var names `*_env` fields point at."""
    found: set[str] = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            if is_secret_name(k) and isinstance(v, (str, int)):
                found.add(str(v))
            elif str(k).lower().endswith("env") and isinstance(v, str):
                env_names.add(v)
            else:
                found |= _secret_values(v, env_names)
    elif isinstance(tree, list):
        for v in tree:
            found |= _secret_values(v, env_names)
    return found


def scrub(text: str, manifest: dict) -> str:
    """Last line of defence over the whole card: secret values seen in the manifest or in the env vars it names."""
    env_names = {"HF_TOKEN", "OPENAI_API_KEY"}
    secrets = _secret_values(manifest, env_names) | {os.environ.get(n, "") for n in env_names}
    for secret in sorted((s for s in secrets if len(s) >= 6), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _SECRET_VALUE.sub(REDACTED, text)


def size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < bound:
            return label
    return "10M<n<100M"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def histogram(scores: list[float], bins: int = 10, width: int = 40) -> str:
    """Text bars, one per equal-width bin between the lowest and highest score."""
    if not scores:
        return "No CLIP scores recorded."
    lo, hi = min(scores), max(scores)
    step = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for s in scores:
        counts[min(int((s - lo) / step), bins - 1)] += 1
    lines = [f"{lo + i * step:7.3f} – {lo + (i + 1) * step:7.3f} | {'█' * round(width * n / max(counts)):<{width}} {n}"
             for i, n in enumerate(counts)]
    return "```text\n" + "\n".join(lines) + "\n```"


def flatten(tree, prefix: str = "") -> list[list]:
    if isinstance(tree, dict):
        return [row for k, v in tree.items() for row in flatten(v, f"{prefix}{k}.")]
    return [[prefix.rstrip("."), tree]]


def llava_entries(run_dir: Path) -> Iterator[dict]:
    """The entries of llava/train.json, then validation.json, one at a time."""
    for split in ("train", "validation"):
        path = run_dir / "llava" / f"{split}.json"
        if path.is_file():
            yield from iter_json_list(path)


def iter_json_list(path: Path, chunk: int = 1 << 20) -> Iterator:
    """The items of a JSON list file, decoded one at a time from a window of the file (never the whole list)."""
    decoder, eof = json.JSONDecoder(), False
    with path.open() as file:
        buffer = file.read(chunk).lstrip()
        if not buffer.startswith("["):
            raise ValueError(f"{path} does not hold a JSON list")
        pos = 1
        while True:
            pos = _BETWEEN_ITEMS.match(buffer, pos).end()
            if pos < len(buffer) and buffer[pos] == "]":
                return
            if pos < len(buffer):
                try:
                    item, end = decoder.raw_decode(buffer, pos)
                    if end < len(buffer) or eof:  # an item that ends the window may go on in the file
                        yield item
                        pos = end
                        continue
                except json.JSONDecodeError:
                    if eof:
                        raise
            elif eof:
                raise ValueError(f"{path} ends inside its JSON list")
            more = file.read(chunk)
            eof = not more
            buffer, pos = buffer[pos:] + more, 0


def pick_examples(run_dir: Path, n: int = 3) -> tuple[list[dict], list[dict]]:
    """(the grid's entries, the card's example conversations) from two streamed passes over llava/: the grid
    shows each image's first entry, images in the order of their last entry, GRID x GRID of them; the
    examples are the first entry of each type (by id suffix, types in the order of their last entry), then
    the first other entries until there are n."""
    first_of_image, last_of_image, first_of_type, last_of_type, head = {}, {}, {}, {}, []
    for i, entry in enumerate(llava_entries(run_dir)):
        first_of_image.setdefault(entry["image"], i)
        last_of_image[entry["image"]] = i
        kind = entry["id"].rsplit("-", 1)[-1]
        first_of_type.setdefault(kind, entry)
        last_of_type[kind] = i
        if len(head) < 2 * n:  # the examples after the first of each type come from these
            head.append(entry)
    picked = [first_of_type[kind] for kind in sorted(last_of_type, key=last_of_type.get)][:n]
    picked += [e for e in head if e not in picked][: n - len(picked)]
    wanted = {first_of_image[image] for image in sorted(last_of_image, key=last_of_image.get)[: GRID * GRID]}
    grid = [entry for i, entry in enumerate(llava_entries(run_dir)) if i in wanted] if wanted else []
    return sorted(grid, key=lambda e: last_of_image[e["image"]]), picked


def _question_answer(entry: dict) -> tuple[str, str]:
    turns = entry["conversations"]
    question = next((t["value"] for t in turns if t["from"] == "human"), "").replace("<image>", "").strip()
    answer = next((t["value"] for t in turns if t["from"] == "gpt"), "").strip()
    return question, answer


def write_example_grid(run_dir: Path, firsts: list[dict], out: Path) -> Path:
    """Up to 3x3 images (`pick_examples`), each with its first record's first question and answer under it."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    rows = max(1, -(-len(firsts) // GRID))
    canvas = Image.new("RGB", (GRID * CELL, rows * (CELL + TEXT_H)), "white")
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(canvas)
    for i, entry in enumerate(firsts):
        x, y = (i % GRID) * CELL, (i // GRID) * (CELL + TEXT_H)
        with Image.open(run_dir / "llava" / entry["image"]) as image:
            thumb = ImageOps.contain(image.convert("RGB"), (CELL - 8, CELL - 8))
        canvas.paste(thumb, (x + (CELL - thumb.width) // 2, y + (CELL - thumb.height) // 2))
        question, answer = _question_answer(entry)
        lines = textwrap.wrap(f"Q: {question}", 30)[:3] + textwrap.wrap(f"A: {answer}", 30)[:3]
        text = "\n".join(lines).encode("latin-1", "replace").decode("latin-1")  # bitmap fonts know latin-1 only
        draw.multiline_text((x + 4, y + CELL + 2), text, fill="black", font=font, spacing=2)
    canvas.save(out, format="PNG")
    return out


def example_conversations(picked: list[dict]) -> str:
    """The picked entries' turns (`pick_examples`)."""
    blocks = []
    for e in picked:
        turns = "\n".join(f"{t['from']}: {t['value']}" for t in e["conversations"])
        blocks.append(f"**{e['id']}** (`{e['image']}`)\n\n```text\n{turns}\n```")
    return "\n\n".join(blocks)


def kept_summary(records_dir: Path) -> tuple[int, list[float], Counter]:
    """Kept images, their CLIP scores, and the turns the grounding verifier removed by (record type, reason kind:
    `absent:dog` -> `absent`), in one streamed pass over the records (the image bytes are not read)."""
    files = sorted(records_dir.glob("*.parquet")) if records_dir.exists() else []
    names = pq.read_schema(files[0]).names if files else []
    kept, scores, removed = 0, [], Counter()
    for row in iter_rows(records_dir, [c for c in ("clip_score", "rejected_turns") if c in names]):
        kept += 1
        if row.get("clip_score") is not None:
            scores.append(row["clip_score"])
        removed.update((turn.get("type", "?"), str(turn.get("reason", "?")).partition(":")[0])
                       for turn in json.loads(row.get("rejected_turns") or "[]"))
    return kept, scores, removed


def rejection_table(counts: Counter) -> str:
    """Turns the grounding verifier removed, by record type and reason kind."""
    if not counts:
        return "The grounding verifier removed no turns."
    return table(["type", "reason", "turns removed"], [[t, r, n] for (t, r), n in sorted(counts.items())])


def exports_section(publish_counts: dict) -> list[str]:
    """Every export with its rows per split and the line that loads it."""
    exports = publish_counts.get("exports")
    if not exports:
        return []
    splits = [s for s in ("train", "validation") if s in publish_counts]
    rows = [["`hf/`", "Hugging Face DatasetDict", *(publish_counts[s]["records"] for s in splits),
             "`datasets.load_from_disk('hf')`"],
            ["`llava/`", "LLaVA JSON + images", *(publish_counts[s]["records"] for s in splits),
             "`--data llava/train.json --image_folder llava` (LLaVA's train.py)"],
            ["`trl_sft/`", "TRL SFT (images + messages)", *(exports["trl_sft"][s] for s in splits),
             "`datasets.load_from_disk('trl_sft')['train']` -> `SFTTrainer(train_dataset=...)`"],
            ["`trl_dpo/`", "TRL DPO grounding pairs", *(exports["trl_dpo"][s] for s in splits),
             "`datasets.load_from_disk('trl_dpo')['train']` -> `DPOTrainer(train_dataset=...)`"],
            ["`llamafactory/`", "LLaMA-Factory sharegpt", *(exports["llamafactory"][s] for s in splits),
             "`dataset: visinstruct_train`, `dataset_dir: llamafactory` in the training YAML"]]
    sources = exports.get("dpo_sources", {})
    return ["## Exports", table(["folder", "format", *splits, "load"], rows),
            "Preference pairs by source (`probe:<kind>`: the probe's answer against the opposite label; "
            "`verifier:<reason>`: the program's answer against the teacher's rejected rewording):",
            table(["source", "pairs"], [[k, v] for k, v in sources.items()]) if sources else "none",
            f"{exports.get('rejected_turns_without_pair', 0)} rejected turns of conversation / detail / reasoning "
            "records make no pair (there is no grounded answer to prefer)."]


def write_dataset_card(run_dir: Path, manifest: dict, publish_counts: dict) -> Path:
    run_dir = Path(run_dir)
    grid, examples = pick_examples(run_dir)
    write_example_grid(run_dir, grid, run_dir / "examples.png")
    kept, scores, removed = kept_summary(run_dir / "records")
    splits = [s for s in ("train", "validation") if s in publish_counts]
    total = sum(publish_counts[s]["records"] for s in splits)
    images = sum(publish_counts[s]["images"] for s in splits)
    name = f"{manifest.get('name', 'visinstruct')} {manifest.get('version', '')}".strip()
    front = {"pretty_name": name, "task_categories": ["visual-question-answering"], "language": ["en"],
             "size_categories": [size_category(total)], "tags": ["llava", "visual-instruction-tuning", "synthetic"]}
    counts = manifest.get("counts", {})
    stages = [[stage, s["in"], s["kept"], s["dropped"], ", ".join(f"{r}: {n}" for r, n in s["reasons"].items()) or "–"]
              for stage, s in counts.get("stages", {}).items()]
    teacher = manifest.get("teacher") or {}
    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---",
        f"# {name}",
        "Visual instruction data in LLaVA's format, made by visinstruct: crawled image-caption pairs, filtered by "
        "CLIP score and deduplicated, with instructions written by a teacher model and checked against each "
        "image's objects. `hf/` loads with `datasets.load_from_disk`; `llava/` holds LLaVA's JSON and images.",
        "## Splits",
        table(["split", "records", "images"], [[s, publish_counts[s]["records"], publish_counts[s]["images"]] for s in splits]),
        table(["type", "records"], [[t, n] for t, n in publish_counts.get("by_type", {}).items()]),
        f"{kept - images} of {kept} kept images have no record (none generated, or every turn rejected).",
        *exports_section(publish_counts),
        "### Turns removed by the grounding verifier",
        rejection_table(removed),
        "## How the images were filtered",
        f"{counts.get('input_urls', '?')} URLs in, {counts.get('kept', '?')} images kept, {counts.get('dropped', '?')} dropped.",
        table(["stage", "in", "kept", "dropped", "drop reasons"], stages),
        "### CLIP score of kept images",
        histogram(scores),
        "## Teacher",
        table(["field", "value"], [["model", teacher.get("model", "?")], ["prompt version", teacher.get("prompt_version", "?")]]
              + [[f"usage.{k}", v] for k, v in (teacher.get("usage") or {}).items()]),
    ]
    for title, figures in (("Grounding evaluation", counts.get("grounding_eval")),  # where the run writes it
                           ("Noise evaluation", counts.get("noise_eval"))):
        if figures:
            parts += [f"## {title}", table(["figure", "value"], flatten(figures))]
    parts += ["## Examples", "![examples](examples.png)", example_conversations(examples),
              "## Configuration", "```yaml\n" + yaml.safe_dump(redact(manifest.get("config", {})), sort_keys=False) + "```"]
    path = run_dir / "README.md"
    path.write_text(scrub("\n\n".join(parts) + "\n", manifest))
    return path
