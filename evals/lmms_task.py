r"""An lmms-eval task folder that runs POPE on your own COCO-format held-out images (`--include_path`).

    python -m evals.lmms_task --instances data/world/annotations/instances_val.json \
        --images data/world/images/val --out outputs/lmms_tasks [--num-images 500] [--seed 0]
    lmms-eval --model visinstruct --model_args checkpoint=outputs/sample/<version>/train/with_negatives \
        --tasks visinstruct_pope --include_path outputs/lmms_tasks --output_path outputs/lmms_eval

The questions are ours (`evals.pope.build_pope_questions`, the same ids and seed as `evals.vlm_eval`),
stored as an HF DatasetDict in lmms-lab/POPE's layout (`question_id`, `question`, `answer`, `image`,
`category`; splits random / popular / adversarial). Everything else is lmms-eval's own POPE task: its
prompt (with LLaVA-1.5's post-prompt), generation settings, `process_results` and aggregations
(`lmms_eval.tasks.pope.utils`), so the figures are lmms-eval's, comparable with its published runs.
Writes `<out>/visinstruct_pope/`: the group `visinstruct_pope` and the tasks `visinstruct_pope_<split>`.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from evals.pope import STRATEGIES, build_pope_questions, load_instances
from schemas.errors import UserError

GROUP = "visinstruct_pope"
# lmms-eval's tasks/pope/pope_random.yaml, with our data in place of lmms-lab-encoder/POPE.
TASK_YAML = """\
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
task: {task}
test_split: {split}
output_type: generate_until
doc_to_visual: !function utils.pope_doc_to_visual
doc_to_text: !function utils.pope_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 128
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function utils.pope_process_results
metric_list:
{metrics}
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
metadata:
  - version: 0.0
"""
METRICS = ("accuracy", "precision", "recall", "f1_score", "yes_ratio")
UTILS = '''"""lmms-eval's own POPE functions (lmms_eval.tasks.pope.utils), for the YAMLs next to this file."""
from lmms_eval.tasks.pope.utils import *  # noqa: F401,F403
'''


def build_task_folder(instances: str | Path, images: str | Path, out: str | Path, num_images: int | None = None,
                      seed: int = 0) -> Path:
    """Writes `<out>/visinstruct_pope/` (data, YAMLs, utils.py); returns that folder."""
    import datasets

    data = load_instances(instances)
    images = Path(images)
    folder = Path(out) / GROUP
    splits = {}
    for split in STRATEGIES:
        questions = build_pope_questions(data, split, num_images, seed=seed)
        missing = sorted({q["image"] for q in questions if not (images / q["image"]).is_file()})
        if missing:
            raise UserError(f"Image {missing[0]} named in {instances} is not in {images}; pass --images the folder "
                            f"of those images.")
        splits[split] = datasets.Dataset.from_list(
            [{"question_id": str(q["question_id"]), "question": q["text"], "answer": q["label"],
              "image": str(images / q["image"]), "image_source": q["image"], "category": split} for q in questions],
            features=datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                        "answer": datasets.Value("string"), "image": datasets.Image(),
                                        "image_source": datasets.Value("string"), "category": datasets.Value("string")}))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    datasets.DatasetDict(splits).save_to_disk(str(folder / "data"))
    metrics = "\n".join(f"  - metric: pope_{m}\n    aggregation: !function utils.pope_aggregate_{m}\n"
                        f"    higher_is_better: true" for m in METRICS)
    for split in STRATEGIES:
        (folder / f"{GROUP}_{split}.yaml").write_text(TASK_YAML.format(
            data=json.dumps(str((folder / "data").resolve())), task=f"{GROUP}_{split}", split=split, metrics=metrics))
    (folder / f"{GROUP}.yaml").write_text(f"group: {GROUP}\ntask:\n" + "".join(f"  - {GROUP}_{s}\n" for s in STRATEGIES))
    (folder / "utils.py").write_text(UTILS)
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", required=True, help="COCO instances JSON of the held-out images")
    p.add_argument("--images", required=True, help="folder holding the images the instances name")
    p.add_argument("--out", required=True, help="folder to pass to lmms-eval's --include_path")
    p.add_argument("--num-images", type=int, default=None, help="images sampled per split (default: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    folder = build_task_folder(args.instances, args.images, args.out, args.num_images, args.seed)
    print(f"wrote {folder}; run: lmms-eval --model visinstruct --model_args checkpoint=<dir> --tasks {GROUP} "
          f"--include_path {args.out}")


if __name__ == "__main__":
    from schemas.errors import exit_on_user_error

    exit_on_user_error(main)
