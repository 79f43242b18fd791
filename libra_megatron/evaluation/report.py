"""Scores of a finished predictions file -> the JSON summary and its Markdown table."""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Dict, List, Sequence

from libra_megatron.evaluation.scoring import extract_choice, score_captions, vqa_accuracy
from libra_megatron.evaluation.tasks import EvalItem


def task_metrics(task: str, items: Sequence[EvalItem], predictions: Dict[str, str],
                 caption_metrics: Sequence[str] = ("cider", "bleu", "meteor", "spice"),
                 caption_tokenizer: str | None = None) -> tuple[Dict[str, float], Dict[str, str]]:
    """Metrics of ``predictions`` (id -> text) over the ``items`` that have one. Percentages for vqa/choice."""
    scored = [item for item in items if item.item_id in predictions]
    if not scored:
        return {}, {"skipped": "no predictions to score"}
    if task == "caption":
        return score_captions({i.item_id: i.references for i in scored},
                              {i.item_id: predictions[i.item_id] for i in scored}, caption_metrics, caption_tokenizer)
    if task == "vqa":
        accuracy = sum(vqa_accuracy(predictions[i.item_id], i.references) for i in scored) / len(scored)
        return {"accuracy": 100.0 * accuracy}, {"normalisation": "VQAv2/EvalAI answer processor"}
    if task == "choice":
        choices = [extract_choice(predictions[i.item_id], i.options) for i in scored]
        correct = sum(c == i.references[0] for c, i in zip(choices, scored))
        metrics = {"accuracy": 100.0 * correct / len(scored),
                   "unparsed": 100.0 * sum(c is None for c in choices) / len(scored)}
        yes_no = [(c, i.references[0]) for c, i in zip(choices, scored) if i.options is None]
        if yes_no:  # POPE's extra numbers: precision / recall / F1 of "yes", and how often the model says yes
            tp = sum(c == "yes" and t == "yes" for c, t in yes_no)
            said_yes = sum(c == "yes" for c, _ in yes_no)
            is_yes = sum(t == "yes" for _, t in yes_no)
            precision = tp / said_yes if said_yes else 0.0
            recall = tp / is_yes if is_yes else 0.0
            metrics.update({"precision": 100.0 * precision, "recall": 100.0 * recall,
                            "f1": 100.0 * (2 * precision * recall / (precision + recall) if precision + recall else 0.0),
                            "yes_ratio": 100.0 * said_yes / len(yes_no)})
        return metrics, {"parsing": "option letter / option text / first yes|no word"}
    raise ValueError(f"unknown task {task!r}")


def build_summary(task: str, items: Sequence[EvalItem], records: Dict[str, Dict], info: Dict[str, Any],
                  caption_metrics: Sequence[str], caption_tokenizer: str | None) -> Dict[str, Any]:
    """The run summary: counts, skipped items by reason, metrics and notes, plus ``info`` (model, options...)."""
    predictions = {i: r["prediction"] for i, r in records.items() if "prediction" in r}
    skipped = Counter(r["skipped"].split(":", 1)[0] for r in records.values() if "skipped" in r)
    metrics, notes = task_metrics(task, items, predictions, caption_metrics, caption_tokenizer)
    return {"task": task, "items": len(items), "scored": sum(1 for i in items if i.item_id in predictions),
            "skipped": sum(skipped.values()), "skipped_by_reason": dict(skipped),
            "missing": sum(1 for i in items if i.item_id not in records), "metrics": metrics, "notes": notes, **info}


def markdown_table(summary: Dict[str, Any]) -> str:
    """One table: the metrics, then the counts."""
    rows: List[str] = ["| metric | value |", "|---|---|"]
    for name, value in summary["metrics"].items():
        rows.append(f"| {name} | {value:.4f} |" if summary["task"] == "caption" else f"| {name} | {value:.2f} |")
    rows.append(f"| items scored | {summary['scored']} / {summary['items']} |")
    rows.append(f"| items skipped (bad image) | {summary['skipped']} |")
    lines = [f"**{summary['task']}** — `{summary.get('data', '')}` — model `{summary.get('model', '')}`", "",
             *rows]
    for key, note in summary["notes"].items():
        lines.append(f"\n- {key}: {note}")
    return "\n".join(lines) + "\n"


def write_summary(folder: str, summary: Dict[str, Any]) -> None:
    """``summary.json`` and ``summary.md`` in ``folder`` (each written atomically)."""
    for name, text in (("summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n"),
                       ("summary.md", markdown_table(summary))):
        path = os.path.join(folder, name)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(path + ".tmp", path)
