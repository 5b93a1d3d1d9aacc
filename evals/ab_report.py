"""The A/B report: what the negatives did. Reads the proof's summary (infra/proof.py's proof.json) and writes

    report.md    per-arm POPE table, image dependence, QA, the difference with minus without, the targets,
                 training losses, seconds per phase, and where each arm's data and checkpoint are
    report.png   per-split accuracy of both arms side by side, with yes-ratio and image dependence
    loss.png     the Stage-1 and both Stage-2 loss curves (from each run's metrics.jsonl)
"""
from __future__ import annotations

import json
from pathlib import Path

from evals.pope import STRATEGIES, format_pope_table

ARMS = ("with_negatives", "without_negatives")  # the proof's two Stage-2 arms (infra/proof.py)
# The targets for the with-negatives arm on the demo world's held-out images (2 CPU cores).
ACCURACY_TARGET = {"random": 0.85, "popular": 0.80, "adversarial": 0.70}
YES_RATIO_RANGE = (0.40, 0.60)
IMAGE_DEPENDENCE_TARGET = 0.6
DIFFERENCE_TARGET = 0.20


def targets(results: dict) -> list[tuple[str, bool, str]]:
    """(what, met, measured) for each target."""
    with_, without = results["with_negatives"], results["without_negatives"]
    rows = []
    for split in STRATEGIES:
        acc = with_["pope"][split]["accuracy"]
        rows.append((f"with_negatives {split} accuracy >= {ACCURACY_TARGET[split]:.0%}", acc >= ACCURACY_TARGET[split],
                     f"{acc:.1%}"))
        ratio = with_["pope"][split]["yes_ratio"]
        rows.append((f"with_negatives {split} yes-ratio in {YES_RATIO_RANGE[0]:.2f}-{YES_RATIO_RANGE[1]:.2f}",
                     YES_RATIO_RANGE[0] <= ratio <= YES_RATIO_RANGE[1], f"{ratio:.2f}"))
        delta = acc - without["pope"][split]["accuracy"]
        rows.append((f"{split} accuracy, with minus without >= +{DIFFERENCE_TARGET * 100:.0f} points",
                     delta >= DIFFERENCE_TARGET, f"{delta * 100:+.1f} points"))
    looked = overall_image_dependence(with_)
    rows.append((f"with_negatives image dependence >= {IMAGE_DEPENDENCE_TARGET}",
                 looked is not None and looked >= IMAGE_DEPENDENCE_TARGET, "n/a" if looked is None else f"{looked:.2f}"))
    return rows


def overall_image_dependence(result: dict) -> float | None:
    parts = result.get("image_dependence", {}).values()
    pairs = sum(p["pairs"] for p in parts)
    return sum(p["flipped"] for p in parts) / pairs if pairs else None


def summary_lines(report: dict) -> list[str]:
    results = report["results"]
    lines = ["", "What the negatives did (POPE on held-out images; accuracy / yes-ratio):"]
    for arm in ARMS:
        r = results[arm]
        cells = "  ".join(f"{s} {r['pope'][s]['accuracy']:.1%} / {r['pope'][s]['yes_ratio']:.2f}" for s in STRATEGIES)
        looked = overall_image_dependence(r)
        lines.append(f"  {arm:18s} {cells}  image dependence {looked if looked is None else round(looked, 2)}")
    met = targets(results)
    lines.append(f"targets met: {sum(m for _, m, _ in met)} of {len(met)}"
                 + "".join(f"\n  NOT MET: {what} (measured {value})" for what, ok, value in met if not ok))
    lines.append(f"proof took {report['total_seconds']:.0f} s; report: {Path(report['out']) / 'report.md'}")
    return lines


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def markdown(report: dict) -> str:
    results, arms, training = report["results"], report["arms"], report["training"]
    out = [f"# What the negatives did: {Path(report['version']).name}", "",
           "Two Stage-2 arms from one Stage-1 checkpoint, at equal compute (same steps, batch size, learning rate "
           "and seed). `with_negatives` trains on the published version; `without_negatives` on the same records "
           "with every turn whose program label is \"no\" removed. Evaluated on held-out images no stage or arm "
           "trained on.", "", "![accuracy, yes-ratio and image dependence per arm](report.png)", ""]
    for arm in ARMS:
        r = results[arm]
        out += [f"## {arm}", "", format_pope_table(r["pope"]), ""]
        dep = ", ".join(f"{s} {_percent(d['image_dependence'])}% ({d['flipped']}/{d['pairs']})"
                        for s, d in r.get("image_dependence", {}).items())
        out += [f"Image dependence (share of answers that flip on an image where the object's presence is the "
                f"opposite): {dep}", "",
                f"QA accuracy on the version's held-out yes/no questions: {_percent(r['qa']['accuracy'])}% "
                f"(n={r['qa']['n']}, yes-ratio {_percent(r['qa']['yes_ratio'])}%)", ""]
    out += ["## With minus without", "", "| split | accuracy | yes-ratio |", "|---|---|---|"]
    for s in STRATEGIES:
        w, wo = results["with_negatives"]["pope"][s], results["without_negatives"]["pope"][s]
        out.append(f"| {s} | {100 * (w['accuracy'] - wo['accuracy']):+.1f} | {w['yes_ratio'] - wo['yes_ratio']:+.2f} |")
    out += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    out += [f"| {what} | {value} | {'yes' if ok else '**no**'} |" for what, ok, value in targets(results)]
    out += ["", "## Training", "", "![loss curves](loss.png)", "",
            "| run | steps x batch | lr | loss first -> last | data | checkpoint |", "|---|---|---|---|---|---|"]
    for name, t in training.items():
        data = arms[name]["file"] if name in arms else "sample world captions (LLaVA plain)"
        out.append(f"| {name} | {t['steps']} x {t['batch_size']} | {t['lr']:g} | {t['loss_first']:.3f} -> "
                   f"{t['loss_last']:.3f} | {data} | {t['checkpoint']} |")
    out += ["", "Arms' data: " + "; ".join(f"{a}: {c['records']} records, {c['turns']} turns ({c['no_turns']} labelled "
                                           f"no, {c['yes_turns']} yes)" for a, c in arms.items()), "",
            "## Seconds per phase", "", "| phase | seconds |", "|---|---|"]
    out += [f"| {name} | {sec:.0f}{' (reused)' if sec == 0 else ''} |" for name, sec in report["phase_seconds"].items()]
    out += [f"| total | {report['total_seconds']:.0f} |", ""]
    return "\n".join(out)


def _plot_results(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.38
    for i, arm in enumerate(ARMS):
        xs = [k + (i - 0.5) * width for k in range(len(STRATEGIES))]
        acc = [100 * results[arm]["pope"][s]["accuracy"] for s in STRATEGIES]
        bars = left.bar(xs, acc, width, label=f"{arm} accuracy")
        ratio = [100 * results[arm]["pope"][s]["yes_ratio"] for s in STRATEGIES]
        left.scatter(xs, ratio, color="black", marker="_" if i == 0 else "x", s=200, zorder=3,
                     label=f"{arm} yes-ratio")
        for bar, value in zip(bars, acc):
            left.text(bar.get_x() + bar.get_width() / 2, value + 1, f"{value:.1f}", ha="center", fontsize=8)
    left.set_xticks(range(len(STRATEGIES)), STRATEGIES)
    left.set_ylim(0, 105)
    left.set_ylabel("%")
    left.axhline(50, color="grey", lw=0.5, ls="--")
    left.set_title("POPE on held-out images")
    left.legend(fontsize=7, loc="lower right")
    looked = [overall_image_dependence(results[arm]) or 0.0 for arm in ARMS]
    right.bar(range(len(ARMS)), looked, color=["C0", "C1"])
    right.set_xticks(range(len(ARMS)), [a.replace("_", "\n") for a in ARMS])
    right.set_ylim(0, 1)
    right.set_title("image dependence")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_losses(training: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (stage1, stage2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, t in training.items():
        metrics = Path(t["checkpoint"]) / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.is_file() else []
        (stage1 if name == "align" else stage2).plot([r["step"] for r in rows], [r["loss"] for r in rows],
                                                     lw=0.8, label=name)
    stage1.set_title("Stage 1 align (captions)")
    stage2.set_title("Stage 2 finetune, both arms")
    for ax in (stage1, stage2):
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, folder: Path) -> dict[str, Path]:
    paths = {"report": folder / "report.md", "plot": folder / "report.png", "loss_plot": folder / "loss.png"}
    _plot_results(report["results"], paths["plot"])
    _plot_losses(report["training"], paths["loss_plot"])
    paths["report"].write_text(markdown(report), encoding="utf-8")
    return paths
