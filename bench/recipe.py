r"""The experiments that chose the proof's recipe (configs/sample.yaml `proof:`): each variant runs the whole
proof (Stage 1, both Stage-2 arms, evals of both) on a published version, with some `proof.*` fields
changed, and its figures are saved to bench/results/recipe.json (one entry per variant, replaced when rerun).

    python -m bench.recipe --version outputs/sample/<version> --variant NAME [--set proof.field=value ...]

Every variant writes under outputs/recipe/<NAME>/ (a rerun reuses its finished phases).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from evals.ab_report import overall_image_dependence, targets
from evals.pope import STRATEGIES
from infra.proof import ARMS, run_proof
from schemas.config import load_config

RESULTS = Path(__file__).parent / "results" / "recipe.json"


def figures(report: dict) -> dict:
    results = report["results"]
    row = {"proof": report["proof_config"], "phase_seconds": report["phase_seconds"],
           "training": {arm: {k: report["training"][arm][k] for k in ("steps", "batch_size", "lr", "loss_first",
                                                                      "loss_last")} for arm in report["training"]}}
    for arm in ARMS:
        row[arm] = {split: {k: round(results[arm]["pope"][split][k], 4) for k in ("accuracy", "yes_ratio", "f1")}
                    for split in STRATEGIES}
        row[arm]["image_dependence"] = overall_image_dependence(results[arm])
        row[arm]["qa_accuracy"] = results[arm]["qa"]["accuracy"]
    row["targets_met"] = [what for what, ok, _ in targets(results) if ok]
    row["targets_missed"] = [f"{what}: {value}" for what, ok, value in targets(results) if not ok]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", required=True, help="published dataset version (outputs/<name>/<version>)")
    p.add_argument("--variant", required=True, help="name of this variant (its folder and JSON key)")
    p.add_argument("--config", default="configs/sample.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="proof.FIELD=VALUE")
    p.add_argument("--root", default="outputs/recipe")
    p.add_argument("--results", default=str(RESULTS), help="JSON file the variant's figures are saved into")
    args = p.parse_args()
    config = load_config(args.config, args.overrides)
    out = Path(args.root) / args.variant
    started = time.perf_counter()
    report = run_proof(config, Path(args.version), Path(config.world.dir), out=out)
    row = {**figures(report), "overrides": args.overrides, "seconds": time.perf_counter() - started,
           "cpu_count": os.cpu_count(), "loadavg_end": os.getloadavg(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    results = Path(args.results)
    saved = json.loads(results.read_text()) if results.is_file() else {}
    saved[args.variant] = row
    results.write_text(json.dumps(saved, indent=1) + "\n")
    print(json.dumps({args.variant: {k: row[k] for k in ("with_negatives", "without_negatives", "targets_missed")}},
                     indent=1))
    print(f"saved to {results}")


if __name__ == "__main__":
    main()
