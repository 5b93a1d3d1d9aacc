"""Training data in: (a) a LLaVA JSON list + image folder (llava_instruct_150k.json,
blip_laion_cc_sbu_558k.json), or (b) a Hugging Face DatasetDict saved with `save_to_disk` — by path
(+ split), or as the pipeline publishes it: `--dataset outputs/<name> --version <v>` -> `<v>/hf/`.

Rows become {id, images (PIL), conversations}; `TrainingSamples` turns them into ids, labels and
preprocessed pixels, `Collate` pads them into batches; the order they are drawn in is
`trainer/sampling.py`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from schemas.errors import UserError
from trainer.config import TrainConfig
from trainer.conversation import ConversationEncoder


@dataclass
class ConversationRow:
    id: str
    images: list  # PIL images, in the order their <image> tokens appear
    conversations: list[dict]  # [{"from": "human"|"gpt", "value": str}, ...]


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


class LlavaJson:
    """LLaVA's own format: [{"id", "image": path relative to the image folder, "conversations": [...]}, ...]."""

    def __init__(self, path: Path, image_folder: Path):
        try:
            self.rows = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{path} is not a readable LLaVA JSON file ({str(err)[:120]}); pass --data a JSON list.") from None
        if not isinstance(self.rows, list) or not all(isinstance(r, dict) and "conversations" in r for r in self.rows):
            raise UserError(f"{path} must be a JSON list of {{id, image, conversations}} objects, as LLaVA's own data files.")
        if not image_folder.is_dir():
            raise UserError(f"Image folder {image_folder} does not exist; pass --image-folder with the images {path.name} names.")
        self.image_folder = image_folder

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> ConversationRow:
        row = self.rows[index]
        images = []
        for name in _as_list(row.get("image")):
            try:
                images.append(Image.open(self.image_folder / name))
            except OSError:
                raise UserError(f"Image {name} of sample {row.get('id')} cannot be read from {self.image_folder}; "
                                f"check --image-folder.") from None
        return ConversationRow(str(row.get("id", index)), images, row["conversations"])

    def text_of(self, index: int) -> tuple[str, list[dict], int]:
        """(id, conversations, number of images) without opening the images."""
        row = self.rows[index]
        return str(row.get("id", index)), row["conversations"], len(_as_list(row.get("image")))

    def types(self) -> list:
        return [r.get("type") for r in self.rows]


class SavedHfDataset:
    """A split of a `datasets.DatasetDict.save_to_disk` folder: columns id, image (Image()), conversations, type."""

    def __init__(self, path: Path, split: str):
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"{path} is not a dataset saved with save_to_disk ({str(err)[:120]}).") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{path} has no split {split!r}; its splits are {', '.join(loaded)}.")
            loaded = loaded[split]
        missing = {"conversations"} - set(loaded.column_names)
        if missing:
            raise UserError(f"{path} has no 'conversations' column; it must hold the pipeline's published schema.")
        self.table = loaded
        self._text = None

    def __len__(self) -> int:
        return len(self.table)

    def text_of(self, index: int) -> tuple[str, list[dict], int]:
        """(id, conversations, number of images) without decoding the images."""
        import datasets

        if self._text is None:
            view = self.table.select_columns([c for c in ("id", "conversations", "image", "images")
                                              if c in self.table.column_names])
            for column in {"image", "images"} & set(view.column_names):
                feature = view.features[column]
                if isinstance(feature, datasets.Image):
                    view = view.cast_column(column, datasets.Image(decode=False))
                elif isinstance(getattr(feature, "feature", None), datasets.Image):
                    view = view.cast_column(column, datasets.Sequence(datasets.Image(decode=False)))
            self._text = view
        row = self._text[index]
        images = _as_list(row.get("image")) + _as_list(row.get("images"))
        return str(row.get("id", index)), row["conversations"], len(images)

    def __getitem__(self, index: int) -> ConversationRow:
        row = self.table[index]
        images = _as_list(row.get("image")) + _as_list(row.get("images"))
        return ConversationRow(str(row.get("id", index)), images, row["conversations"])

    def types(self) -> list:
        return list(self.table["type"]) if "type" in self.table.column_names else [None] * len(self.table)


class RowView:
    """The rows at `indices` of another row source, in that order."""

    def __init__(self, rows, indices: list[int]):
        self.rows, self.indices = rows, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> ConversationRow:
        return self.rows[self.indices[index]]

    def text_of(self, index: int) -> tuple[str, list[dict], int]:
        return self.rows.text_of(self.indices[index])

    def types(self) -> list:
        present = self.rows.types()
        return [present[i] for i in self.indices]


class OfTypes(RowView):
    """The rows whose `type` (conversation, detail, reasoning, negatives, caption) is one of `types`."""

    def __init__(self, rows, types: list[str]):
        present = rows.types()
        super().__init__(rows, [i for i, t in enumerate(present) if t in types])
        if not self.indices:
            raise UserError(f"No rows of type {', '.join(types)} in the data; types there: "
                            f"{', '.join(sorted({str(t) for t in present}))}.")


def published_dataset(root: Path, version: str | None) -> Path:
    """`outputs/<name>` + version -> that version's `hf/` folder; a wrong version lists the ones there."""
    if not root.is_dir():
        raise UserError(f"Dataset folder {root} does not exist; pass --dataset outputs/<name> of a pipeline run.")
    versions = sorted(p.name for p in root.iterdir() if (p / "hf").is_dir())
    if version is None or not (root / version / "hf").is_dir():
        listed = ", ".join(versions) if versions else "none yet (publish one first)"
        said = "No --version given" if version is None else f"Dataset version {version} does not exist in {root}"
        raise UserError(f"{said}; published versions there: {listed}.")
    return root / version / "hf"


def open_rows(config: TrainConfig):
    rows = _open_rows(config)
    if config.types:
        rows = OfTypes(rows, config.types)
    if len(rows) == 0:
        raise UserError("The training data has no rows; check --data / --dataset and --split.")
    if config.text_data:
        return mixed_with_text(rows, config)
    return rows


class Concatenated:
    """Two row sources one after the other."""

    def __init__(self, first, second):
        self.parts = (first, second)

    def __len__(self) -> int:
        return len(self.parts[0]) + len(self.parts[1])

    def _at(self, index: int):
        first = len(self.parts[0])
        return (self.parts[0], index) if index < first else (self.parts[1], index - first)

    def __getitem__(self, index: int) -> ConversationRow:
        part, at = self._at(index)
        return part[at]

    def text_of(self, index: int) -> tuple[str, list[dict], int]:
        part, at = self._at(index)
        return part.text_of(at)

    def types(self) -> list:
        return self.parts[0].types() + self.parts[1].types()


def mixed_with_text(rows, config: TrainConfig):
    """The multimodal rows plus text-only rows from `text_data`, so that text-only samples make up
    `text_ratio` of the whole (a guard against losing the language model's text ability in Stage 2):
    n * r / (1 - r) of them, a seeded draw (with repeats when the text data is smaller)."""
    import random

    text = LlavaJson(Path(config.text_data), Path(config.text_data).parent)
    if len(text) == 0:
        raise UserError(f"--text-data {config.text_data} holds no rows; pass a LLaVA JSON of text-only conversations.")
    with_images = [i for i in range(len(text)) if text.text_of(i)[2]]
    if with_images:
        raise UserError(f"--text-data {config.text_data} row {text.text_of(with_images[0])[0]} has an image; text "
                        f"mixing takes text-only conversations (images belong in --data).")
    wanted = round(len(rows) * config.text_ratio / (1 - config.text_ratio))
    rng = random.Random(config.seed)
    picks = rng.sample(range(len(text)), wanted) if wanted <= len(text) else [rng.randrange(len(text)) for _ in range(wanted)]
    return Concatenated(rows, RowView(text, picks))


def _open_rows(config: TrainConfig):
    if config.dataset:
        return SavedHfDataset(published_dataset(Path(config.dataset), config.version), config.split)
    if not config.data:
        raise UserError("No training data given; pass --data (a LLaVA JSON or a saved dataset folder) or --dataset + --version.")
    path = Path(config.data)
    if path.is_dir():
        return SavedHfDataset(path, config.split)
    if not path.is_file():
        raise UserError(f"--data {path} does not exist; pass a LLaVA JSON file or a save_to_disk dataset folder.")
    return LlavaJson(path, Path(config.image_folder) if config.image_folder else path.parent)


class TrainingSamples(torch.utils.data.Dataset):
    """Row -> {input_ids, labels, pixel_values [n_images, 3, H, W]} (pure; safe in DataLoader workers)."""

    def __init__(self, rows, encoder: ConversationEncoder, preprocess):
        self.rows, self.encoder, self.preprocess = rows, encoder, preprocess

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        try:
            encoded = self.encoder.encode(row.conversations, len(row.images))
        except ValueError as err:
            raise UserError(f"Sample {row.id}: {err}; fix that row of the data.") from None
        pixels = [self.preprocess(image.convert("RGB")) for image in row.images[: encoded.num_images]]
        return {"input_ids": encoded.input_ids, "labels": encoded.labels, "pixel_values": pixels}


class Collate:
    """Pads a list of samples into a batch (right for training, left for generation prompts); the batch's
    images are stacked in reading order."""

    def __init__(self, pad_id: int, image_size: tuple[int, int], pad_left: bool = False):
        self.pad_id, self.image_size, self.pad_left = pad_id, image_size, pad_left

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), length), self.pad_id, dtype=torch.long)  # [B, T]
        labels = torch.full((len(samples), length), -100, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(samples), length), dtype=torch.long)  # [B, T]
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            at = slice(length - n, length) if self.pad_left else slice(0, n)
            ids[i, at], labels[i, at], mask[i, at] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
        pixels = [p for s in samples for p in s["pixel_values"]]
        pixel_values = torch.stack(pixels) if pixels else torch.zeros(0, 3, *self.image_size)  # [M, 3, H, W]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values}
