"""How grounded the published answers are, measured against ground-truth objects no stage read.

`evaluate.ground_truth` names COCO instances files (the sample world's); images are matched by
file name. Reported in the manifest:

- `absent_object_rate`: share of final answers (gpt turns) that assert an object the image does
  not contain (mentions inside a negation do not count); `count_mismatch_rate` likewise for counts;
- `negative_label_error_rate`: share of probe turns whose answer, read by POPE's rule (`filters.yes_no`),
  is wrong for the image;
- `yield`: LLaVA records and images with at least one record, per input URL and per image sent
  to the teacher (`teacher_selected`; the other images keep only their program-phrased probes);
- `tagging`: precision/recall of CLIP zero-shot tags against the truth, at the configured
  threshold and at the best-F1 threshold (to calibrate `objects.tag_threshold`).
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from evals.noise_eval import iter_rows
from filters.grounding import mentions
from filters.yes_no import answer_to_label
from schemas.coco import load_coco_instances, url_file_name
from schemas.vocabulary import COCO_CATEGORIES
from schemas.config import PipelineConfig


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _truth(probe: dict, gt: list) -> str:
    counts = Counter(o.category for o in gt)
    name = probe["category"]
    if probe["kind"] in ("present", "absent"):
        return "yes" if counts[name] else "no"
    if probe["kind"] == "count":
        asked = next((m.count for m in mentions(probe["question"]) if m.category == name), None)
        return "yes" if asked == counts[name] else "no"
    boxes = [o.box for o in gt if o.category == name]  # position: "Is the X on the <side> side?"
    if len(boxes) != 1:
        return "no"
    centre = (boxes[0][0] + boxes[0][2]) / 2
    asked = "left" if "left side" in probe["question"] else "right"
    return "yes" if (centre < 0.5) == (asked == "left") else "no"


def evaluate_answers(rows: Iterable[dict], truth: dict[str, list], vocabulary: tuple[str, ...]) -> dict:
    answers = absent = miscounted = unknown = 0
    probes_seen = probe_errors = 0
    for row in rows:
        gt = truth.get(url_file_name(row["url"]))
        if gt is None:
            unknown += 1
            continue
        counts = Counter(o.category for o in gt)
        probes = row["probes"] or []
        for item in json.loads(row["instructions"] or "[]"):
            gpt = [t["value"] for t in item["conversations"] if t["from"] == "gpt"]
            human = [t["value"] for t in item["conversations"] if t["from"] == "human"]
            for i, answer in enumerate(gpt):
                answers += 1
                found = [m for m in mentions(answer, vocabulary) if not m.negated]
                absent += any(counts[m.category] == 0 for m in found)
                miscounted += any(m.count is not None and counts[m.category] and m.count != counts[m.category]
                                  for m in found)
                if item["type"] == "negatives":
                    probe = next(p for p in probes if p["question"] == human[i].replace("<image>\n", ""))
                    probes_seen += 1
                    probe_errors += answer_to_label(answer) != _truth(probe, gt)
    return {"answers": answers, "absent_object_rate": _ratio(absent, answers),
            "count_mismatch_rate": _ratio(miscounted, answers), "probe_turns": probes_seen,
            "negative_label_error_rate": _ratio(probe_errors, probes_seen), "images_without_ground_truth": unknown}


def evaluate_tagging(config: PipelineConfig, records_dir: Path, truth: dict[str, list]) -> dict | None:
    """The embeddings of the records with ground truth, read a batch at a time into one [N, D] array (no
    Python list per float)."""
    from filters.object_tagger import ClipObjectTagger

    vocabulary = list(config.objects.vocabulary or COCO_CATEGORIES)
    embeddings, present = [], []
    for path in sorted(records_dir.glob("*.parquet")) if records_dir.exists() else []:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=["url", "embedding"]):
            files = [url_file_name(url) for url in batch.column("url").to_pylist()]
            known = [i for i, (name, ok) in enumerate(zip(files, batch.column("embedding").is_valid().to_pylist()))
                     if ok and name in truth]
            if not known:
                continue
            column = batch.column("embedding").take(pa.array(known, pa.int64()))
            embeddings.append(column.flatten().to_numpy().astype(np.float32).reshape(len(known), -1))
            for i in known:
                row = np.zeros(len(vocabulary), bool)
                row[[vocabulary.index(o.category) for o in truth[files[i]]]] = True
                present.append(row)
    if not present:
        return None
    tagger = ClipObjectTagger(config.clip, vocabulary, config.objects.tag_threshold, config.objects.max_tags)
    sims = tagger.scores(np.concatenate(embeddings))  # [N, V]
    present = np.stack(present)
    top = np.argsort(-sims, axis=1)[:, : config.objects.max_tags]
    in_top = np.zeros_like(present)
    np.put_along_axis(in_top, top, True, axis=1)

    def at(threshold: float) -> dict:
        tagged = in_top & (sims >= threshold)
        tp = int((tagged & present).sum())
        precision, recall = _ratio(tp, int(tagged.sum())), _ratio(tp, int(present.sum()))
        f1 = round(2 * precision * recall / (precision + recall), 4) if precision and recall else 0.0
        return {"threshold": round(float(threshold), 4), "precision": precision, "recall": recall, "f1": f1}

    sweep = [at(t) for t in np.quantile(sims, np.linspace(0.5, 0.999, 60))]
    return {"images": len(present), "at_configured": at(config.objects.tag_threshold),
            "best_f1": max(sweep, key=lambda r: r["f1"])}


def evaluate_grounding(config: PipelineConfig, records_dir: Path, dropped_dir: Path, input_urls: int) -> dict:
    """Streamed over the records (answers and yield in one pass, the tagging embeddings in another); the
    ground truth is held whole, as an index by file name."""
    truth = load_coco_instances(config.evaluate.ground_truth)
    vocabulary = tuple(config.objects.vocabulary or COCO_CATEGORIES)
    seen = {"images": 0, "sent": 0, "records": 0}

    def counted(rows):
        for row in rows:
            seen["images"] += 1
            seen["sent"] += row["teacher_selected"] is not False
            seen["records"] += len(json.loads(row["instructions"] or "[]"))
            yield row

    result = evaluate_answers(counted(iter_rows(records_dir, ["uid", "url", "instructions", "probes", "teacher_selected"])),
                              truth, vocabulary)
    dropped_sent = sum(r["stage"] in ("generate", "verify") and r["teacher_selected"] is not False
                       for r in iter_rows(dropped_dir, ["stage", "teacher_selected"]))
    images, kept_sent, records = seen["images"], seen["sent"], seen["records"]
    sent = dropped_sent + kept_sent
    result["yield"] = {"llava_records": records, "images_with_records": images, "input_urls": input_urls,
                       "images_sent_to_teacher": sent, "images_with_program_probes_only": images - kept_sent,
                       "records_per_input_url": _ratio(records, input_urls),
                       "images_kept_per_image_sent": _ratio(kept_sent, sent)}
    result["tagging"] = evaluate_tagging(config, records_dir, truth)
    return result
