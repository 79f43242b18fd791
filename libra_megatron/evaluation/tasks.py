"""Evaluation sets: each file format -> a list of :class:`EvalItem` (id, image path, question, ground truth).

* ``caption`` — COCO-Karpathy ``dataset_coco.json`` (``images[*].filepath/filename/sentences[*].raw/split``; the
  ``--split``, default ``test``, is kept), COCO caption annotations (``images[*].id/file_name`` +
  ``annotations[*].image_id/caption``), or JSON lines ``{"image", "caption" | "captions"}`` (the demo's held-out
  file).
* ``vqa`` — VQAv2 (``--questions`` ``{"questions": [{question_id, image_id, question}]}`` + ``--annotations``
  ``{"annotations": [{question_id, answers: [{answer}]}]}``; images ``COCO_<split>_<image_id:012d>.jpg``, see
  ``--image-pattern``), TextVQA (``{"data": [{question_id, image_id, question, answers: [str]}]}``; images
  ``<image_id>.jpg``), or JSON lines ``{"question_id", "image", "question", "answers"}``.
* ``choice`` — JSON lines: POPE (``{"question_id", "image", "text", "label": "yes"|"no"}``) or multiple choice
  (``{"id"|"question_id", "image", "question", "options"|"choices": [...], "answer": "B" | 1 | option text}``),
  or a JSON list of such rows.

Image paths are relative to ``image_root`` (default: the folder of the data file). A row whose fields are wrong
raises ``ValueError`` naming the file, the row and the field; a missing or unreadable *image* is not a data-file
error: the runner skips and counts it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

TASKS = ("caption", "vqa", "choice")
CAPTION_PROMPT = ""  # raw template, empty prompt: the model continues "<s> image \n" with a caption
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


@dataclass
class EvalItem:
    """One question about one image; ``references`` are captions (caption), answers (vqa) or the correct choice
    (choice: a letter, or ``yes``/``no``)."""

    item_id: str
    image: str
    question: str
    references: List[str]
    options: Optional[List[str]] = None


def _read_json_or_lines(path: str, keys: Sequence[str] = ()) -> Any:
    """A JSON document, or the list of rows of a JSON-lines file. A one-line object holding none of the format's
    document ``keys`` is a JSON-lines file of one row. A document starting with ``[`` or ``{`` whose first line is
    not JSON on its own is a broken document: the error names the document's own line and column."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        document_error = error
    else:
        if isinstance(data, dict) and "\n" not in text.strip() and not any(key in data for key in keys):
            return [data]
        return data
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 / U+0085 may sit in strings
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                if not rows and text.lstrip().startswith(("[", "{")):
                    raise ValueError(f"{path}: invalid JSON at line {document_error.lineno} column "
                                     f"{document_error.colno} ({document_error.msg})") from None
                raise ValueError(f"{path}: line {number} is not JSON ({error})") from None
    return rows


def _field(row: Dict[str, Any], names: tuple, path: str, where: str, kind: type = str) -> Any:
    if not isinstance(row, dict):
        raise ValueError(f"{path}: {where}: a {type(row).__name__}, not an object")
    for name in names:
        if name in row:
            value = row[name]
            if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, kind):
                raise ValueError(f"{path}: {where}: field '{name}' must be {kind.__name__}, got {type(value).__name__}")
            return value
    raise ValueError(f"{path}: {where}: missing field '{names[0]}'")


def load_caption_items(path: str, image_root: Optional[str] = None, split: str = "test") -> List[EvalItem]:
    """Caption items (one per image, every reference caption kept) from any of the caption formats."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    data = _read_json_or_lines(path, ("images", "annotations"))
    items: List[EvalItem] = []
    if isinstance(data, dict) and "images" in data and "annotations" in data:  # COCO caption annotations
        captions: Dict[str, List[str]] = {}
        for n, ann in enumerate(data["annotations"]):
            where = f"annotations[{n}]"
            captions.setdefault(_field(ann, ("image_id",), path, where), []).append(
                _field(ann, ("caption",), path, where))
        for n, image in enumerate(data["images"]):
            image_id = _field(image, ("id",), path, f"images[{n}]")
            refs = captions.get(image_id)
            if refs:
                items.append(EvalItem(image_id, os.path.join(root, _field(image, ("file_name",), path, f"images[{n}]")),
                                      CAPTION_PROMPT, refs))
        return items
    if isinstance(data, dict) and "images" in data:  # Karpathy
        for n, image in enumerate(data["images"]):
            where = f"images[{n}]"
            if not isinstance(image, dict):
                raise ValueError(f"{path}: {where}: a {type(image).__name__}, not an object")
            if split and image.get("split") not in (split, None):
                continue
            sentences = _field(image, ("sentences",), path, where, list)
            if not sentences:
                raise ValueError(f"{path}: {where}: field 'sentences' is empty (no reference caption)")
            refs = [_field(s, ("raw",), path, f"{where}.sentences[{k}]") for k, s in enumerate(sentences)]
            name = os.path.join(image.get("filepath", ""), _field(image, ("filename",), path, where))
            item_id = str(image.get("cocoid", image.get("imgid", n)))
            items.append(EvalItem(item_id, os.path.join(root, name), CAPTION_PROMPT, refs))
        return items
    if isinstance(data, list):  # JSON lines / list: {"image", "caption" | "captions"}
        for n, row in enumerate(data):
            where = f"row {n + 1}"
            if not isinstance(row, dict):
                raise ValueError(f"{path}: {where} is not an object")
            refs = row["captions"] if "captions" in row else [_field(row, ("caption",), path, where)]
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                raise ValueError(f"{path}: {where}: field 'captions' must be a non-empty list of strings")
            image = _field(row, ("image",), path, where)
            item_id = str(row.get("id", row.get("image_id", image)))
            items.append(EvalItem(item_id, os.path.join(root, image), CAPTION_PROMPT, list(refs)))
        return items
    raise ValueError(f"{path}: not a caption file (Karpathy 'images', COCO 'images'+'annotations', or JSON lines)")


def load_vqa_items(path: str, annotations: Optional[str] = None, image_root: Optional[str] = None,
                   image_pattern: Optional[str] = None) -> List[EvalItem]:
    """VQA items from VQAv2 questions (+ ``annotations``), TextVQA JSON or JSON lines."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    data = _read_json_or_lines(path, ("questions", "data"))
    items: List[EvalItem] = []
    if isinstance(data, dict) and "questions" in data:  # VQAv2
        if not annotations:
            raise ValueError(f"{path}: VQAv2 questions need --annotations (the matching annotation file)")
        ann = _read_json_or_lines(annotations, ("annotations",))
        if not isinstance(ann, dict) or "annotations" not in ann:
            raise ValueError(f"{annotations}: missing field 'annotations'")
        answers = {}
        for n, row in enumerate(ann["annotations"]):
            where = f"annotations[{n}]"
            answers[_field(row, ("question_id",), annotations, where)] = [
                _field(a, ("answer",), annotations, f"{where}.answers") for a in _field(row, ("answers",), annotations, where, list)]
        split = data.get("data_subtype", "val2014")
        pattern = image_pattern or f"COCO_{split}_{{image_id:012d}}.jpg"
        for n, row in enumerate(data["questions"]):
            where = f"questions[{n}]"
            qid = _field(row, ("question_id",), path, where)
            if qid not in answers:
                raise ValueError(f"{annotations}: no annotation for question_id {qid}")
            image_id = row.get("image_id")
            if not isinstance(image_id, int):
                raise ValueError(f"{path}: {where}: field 'image_id' must be int")
            items.append(EvalItem(qid, os.path.join(root, pattern.format(image_id=image_id)),
                                  _field(row, ("question",), path, where) + VQA_SUFFIX, answers[qid]))
        return items
    rows = data["data"] if isinstance(data, dict) and "data" in data else data
    if not isinstance(rows, list):
        raise ValueError(f"{path}: not a VQA file (VQAv2 'questions', TextVQA 'data', or JSON lines)")
    pattern = image_pattern or "{image_id}.jpg"
    for n, row in enumerate(rows):
        where = f"row {n + 1}"
        qid = _field(row, ("question_id", "id"), path, where)
        image = row.get("image") or pattern.format(image_id=_field(row, ("image_id",), path, where))
        refs = _field(row, ("answers",), path, where, list)
        refs = [a["answer"] if isinstance(a, dict) else a for a in refs]
        if not refs or not all(isinstance(a, str) for a in refs):
            raise ValueError(f"{path}: {where}: field 'answers' must be a non-empty list of strings")
        items.append(EvalItem(qid, os.path.join(root, image), _field(row, ("question",), path, where) + VQA_SUFFIX, refs))
    return items


def _choice_answer(row: Dict[str, Any], options: List[str], path: str, where: str) -> str:
    answer = row.get("answer")
    letters = [chr(ord("A") + i) for i in range(len(options))]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return letters[answer]
    if isinstance(answer, str):
        if answer.strip().upper() in letters:
            return answer.strip().upper()
        if answer in options:
            return letters[options.index(answer)]
    raise ValueError(f"{path}: {where}: field 'answer' must be an option letter, index or text, got {answer!r}")


def load_choice_items(path: str, image_root: Optional[str] = None) -> List[EvalItem]:
    """Multiple-choice and yes/no items (POPE / ScienceQA-style JSON lines)."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    data = _read_json_or_lines(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a choice file is JSON lines (or a JSON list) of questions")
    items: List[EvalItem] = []
    for n, row in enumerate(data):
        where = f"row {n + 1}"
        if not isinstance(row, dict):
            raise ValueError(f"{path}: {where} is not an object")
        qid = _field(row, ("question_id", "id"), path, where)
        image = os.path.join(root, _field(row, ("image",), path, where))
        question = _field(row, ("question", "text"), path, where)
        options = row.get("options", row.get("choices"))
        if options is None:  # yes / no
            label = _field(row, ("label", "answer"), path, where).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"{path}: {where}: field 'label' must be yes or no, got {label!r}")
            items.append(EvalItem(qid, image, question + VQA_SUFFIX, [label]))
            continue
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise ValueError(f"{path}: {where}: field 'options' must be a list of at least two strings")
        listed = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options))
        items.append(EvalItem(qid, image, f"{question}\n{listed}{CHOICE_SUFFIX}",
                              [_choice_answer(row, options, path, where)], options=list(options)))
    return items


def load_items(task: str, path: str, annotations: Optional[str] = None, image_root: Optional[str] = None,
               split: str = "test", image_pattern: Optional[str] = None) -> List[EvalItem]:
    """The items of ``task`` in ``path``; ids must be unique (they key the predictions file)."""
    if task == "caption":
        items = load_caption_items(path, image_root, split)
    elif task == "vqa":
        items = load_vqa_items(path, annotations, image_root, image_pattern)
    elif task == "choice":
        items = load_choice_items(path, image_root)
    else:
        raise ValueError(f"unknown task {task!r}: {TASKS}")
    seen = set()
    for item in items:
        if item.item_id in seen:
            raise ValueError(f"{path}: duplicate item id {item.item_id!r}")
        seen.add(item.item_id)
    if not items:
        raise ValueError(f"{path}: no {task} items" + (f" in split {split!r}" if task == "caption" else ""))
    return items
