"""The sample world as a crawler sees it: a URL list with injected noise, and the noise manifest.

    python -m infra.world_noise --config configs/sample.yaml     # renders (once) and writes the URL list

Noise, recorded per URL in `noise_manifest.parquet` (read by evaluations only, never by the
pipeline): captions swapped with another image's, near-duplicates (jittered, cropped,
re-encoded re-renders), exact duplicates, empty and 5000-character garbage captions, hostile
URLs (404, 500, slow, HTML as image, truncated JPEG, decompression bomb, redirect loop), and
copies of held-out (val) images — exact, re-encoded and cropped — that the eval-leak guard must
catch (kind `eval_copy`, detail `<how>:<val file name>`).
"""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from infra.sample_world import plan_scene, render_scene, render_world
from schemas.config import WorldConfig

# What the pipeline must answer for each kind of noise (`reason_kind` of the drop reason).
EXPECTED_REASON = {
    "http_404": "download_error:http_404",
    "http_500": "download_error:http_500",
    "slow": "download_error:timeout",
    "redirect_loop": "download_error:redirect_loop",
    "html_as_image": "decode_error",
    "truncated_jpeg": "decode_error",
    "decompression_bomb": "pixels_too_large",
    "empty_caption": "caption_empty",
    "garbage_caption": "caption_too_long",
}
HOSTILE_URLS = {  # kind -> path pattern
    "http_404": "fault/404/{i}.jpg",
    "http_500": "fault/500/{i}.jpg",
    "slow": "fault/slow/{i}.jpg",
    "redirect_loop": "fault/redirect/{i}.jpg",
    "html_as_image": "fault/html/{i}.jpg",
    "truncated_jpeg": "fault/truncated/truncated_{i}.jpg",
    "decompression_bomb": "fault/bomb/bomb_{i}.png",
}
SWAP_FRACTION = 0.12  # issue target: >= 10%
NEAR_DUP_FRACTION = 0.05
EXACT_DUP_FRACTION = 0.02
EVAL_COPY = "eval_copy"  # a held-out image leaked into the training URL list
EVAL_COPY_FRACTION = 0.5  # of the val images, split evenly over EVAL_COPY_KINDS
EVAL_COPY_KINDS = ("exact", "reencoded", "cropped")
EVAL_CROP = 0.05  # a cropped copy loses this share of each side's length, split at random between its two edges


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A ~20 KB PNG that declares width x height 1-bit pixels: 400 M pixels if anyone decodes it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    idat = zlib.compress(row * 64, 9)  # only the first rows: the rest is missing, on purpose
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def near_duplicate(layout, rng: np.random.Generator) -> bytes:
    """Same scene re-rendered with a few pixels of jitter, cropped by a few percent, re-encoded."""
    image = render_scene(layout, jitter=(int(rng.integers(-3, 4)), int(rng.integers(-3, 4))))
    w, h = image.size
    c = int(rng.integers(2, max(3, w // 20)))
    image = image.crop((c, c, w - c, h - c)).resize((w, h), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(70, 86)))
    return buffer.getvalue()


def eval_copy(data: bytes, how: str, rng: np.random.Generator) -> bytes:
    """A held-out image as a leak would bring it: the same bytes, re-encoded as JPEG at another quality, or
    cropped by EVAL_CROP of each side (kept at its cropped size) and re-encoded."""
    if how == "exact":
        return data
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if how == "cropped":
        w, h = image.size
        mx, my = int(w * EVAL_CROP), int(h * EVAL_CROP)
        left, top = int(rng.integers(0, mx + 1)), int(rng.integers(0, my + 1))
        image = image.crop((left, top, w - (mx - left), h - (my - top)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(55, 81)))
    return buffer.getvalue()


def _load_split(world_dir: Path, split: str) -> tuple[list[dict], dict[int, list[str]]]:
    """(the split's images by id, image id -> captions); nothing for a split the world was rendered without."""
    path = world_dir / "annotations" / f"instances_{split}.json"
    if not path.exists():
        return [], {}
    captions: dict[int, list[str]] = {}
    for c in json.loads((world_dir / "annotations" / f"captions_{split}.json").read_text())["annotations"]:
        captions.setdefault(c["image_id"], []).append(c["caption"])
    return sorted(json.loads(path.read_text())["images"], key=lambda im: im["id"]), captions


def build_url_list(world_dir: Path, base_url: str, seed: int) -> dict:
    """Writes urls.parquet (url, caption) and noise_manifest.parquet (url, kind, detail, image_id)."""
    rng = np.random.default_rng([seed, 7])
    images, captions = _load_split(world_dir, "train")
    n = len(images)
    rows = []  # dicts: path, caption, kind, detail, image_id
    for im in images:
        rows.append({"path": f"images/train/{im['file_name']}", "caption": str(rng.choice(captions[im["id"]])),
                     "kind": "clean", "detail": "", "image_id": im["id"]})
    order = rng.permutation(n)
    n_hostile = max(2, n // 200)
    swap, empty, garbage = np.split(order[: int(n * SWAP_FRACTION) + 2 * n_hostile],
                                    [int(n * SWAP_FRACTION), int(n * SWAP_FRACTION) + n_hostile])
    for i in swap:  # a caption of an image from another scene type, so the pair really mismatches
        partner = next(j for j in rng.permutation(n) if images[j]["scene"] != images[i]["scene"])
        rows[i].update(caption=str(rng.choice(captions[images[partner]["id"]])), kind="caption_swapped",
                       detail=str(images[partner]["id"]))
    for i in empty:
        rows[i].update(caption="", kind="empty_caption")
    for i in garbage:
        rows[i].update(caption="".join(rng.choice(list("abcdefghij#$%&*@!~ 0123456789"), 5000)), kind="garbage_caption")

    noise_dir, fault_dir = world_dir / "noise", world_dir / "faults"
    noise_dir.mkdir(exist_ok=True)
    fault_dir.mkdir(exist_ok=True)
    clean = [i for i in order if rows[i]["kind"] == "clean"]
    for i in clean[: int(n * NEAR_DUP_FRACTION)]:
        im = images[i]
        name = f"near_{im['id']:012d}.jpg"
        (noise_dir / name).write_bytes(near_duplicate(plan_scene(im["id"], seed, im["width"]), rng))
        rows.append({"path": f"noise/{name}", "caption": str(rng.choice(captions[im["id"]])), "kind": "near_duplicate",
                     "detail": rows[i]["path"], "image_id": im["id"]})
    for i in clean[-int(n * EXACT_DUP_FRACTION) or -1:]:
        im = images[i]
        name = f"dup_{im['id']:012d}.jpg"
        (noise_dir / name).write_bytes((world_dir / rows[i]["path"]).read_bytes())
        rows.append({"path": f"noise/{name}", "caption": rows[i]["caption"], "kind": "exact_duplicate",
                     "detail": rows[i]["path"], "image_id": im["id"]})

    val, val_captions = _load_split(world_dir, "val")
    leaked = [val[i] for i in rng.permutation(len(val))[: int(len(val) * EVAL_COPY_FRACTION)]]
    for k, im in enumerate(leaked):
        how = EVAL_COPY_KINDS[k % len(EVAL_COPY_KINDS)]
        name = f"eval_{how}_{im['id']:012d}.jpg"
        data = (world_dir / "images" / "val" / im["file_name"]).read_bytes()
        (noise_dir / name).write_bytes(eval_copy(data, how, rng))
        rows.append({"path": f"noise/{name}", "caption": str(rng.choice(val_captions[im["id"]])), "kind": EVAL_COPY,
                     "detail": f"{how}:{im['file_name']}", "image_id": im["id"]})

    sample = (world_dir / rows[clean[0]]["path"]).read_bytes()
    (fault_dir / "slow.jpg").write_bytes(sample)
    for kind, pattern in HOSTILE_URLS.items():
        for k in range(n_hostile):
            path = pattern.format(i=k)
            if kind == "truncated_jpeg":
                (fault_dir / Path(path).name).write_bytes(sample[: len(sample) * 3 // 5])
            if kind == "decompression_bomb":
                (fault_dir / Path(path).name).write_bytes(bomb_png())
            rows.append({"path": path, "caption": str(rng.choice(captions[images[int(rng.integers(n))]["id"]])),
                         "kind": kind, "detail": "", "image_id": -1})

    rows = [rows[i] for i in rng.permutation(len(rows))]
    base = base_url.rstrip("/")
    urls = [f"{base}/{r['path']}" for r in rows]
    pq.write_table(pa.table({"url": urls, "caption": [r["caption"] for r in rows]}), world_dir / "urls.parquet")
    pq.write_table(pa.table({"url": urls, "kind": [r["kind"] for r in rows],
                             "detail": [f"{base}/{r['detail']}" if r["detail"].startswith(("images/", "noise/")) else r["detail"] for r in rows],
                             "image_id": [r["image_id"] for r in rows]}), world_dir / "noise_manifest.parquet")
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return {"urls": len(rows), "kinds": kinds}


def prepare_world(config: WorldConfig, workers: int = 2) -> Path:
    """Renders the world unless the same parameters were rendered there before; always rewrites the URL list."""
    world_dir = Path(config.dir)
    params = {"num_train": config.num_images, "num_val": config.num_val, "seed": config.seed}
    marker = world_dir / "world.json"
    if not marker.exists() or json.loads(marker.read_text()).get("params") != params:
        summary = render_world(world_dir, config.num_images, config.num_val, seed=config.seed, workers=workers)
        marker.write_text(json.dumps({"params": params, "render": summary}, indent=2))
        print(f"rendered the sample world: {summary}")
    noise = build_url_list(world_dir, f"http://{config.host}:{config.port}", config.seed)
    print(f"URL list {world_dir / 'urls.parquet'}: {noise['urls']} URLs, noise {noise['kinds']}")
    return world_dir


def main() -> None:
    from schemas.errors import exit_on_user_error
    from pipelines.cli import parse_config, parser

    args = parser(__doc__.splitlines()[0]).parse_args()
    exit_on_user_error(lambda: prepare_world(parse_config(args).world))


if __name__ == "__main__":
    main()
