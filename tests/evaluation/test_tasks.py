"""Evaluation data files: one-row JSON lines, line separators inside strings, a truncated JSON document and broken
Karpathy entries are read or refused with the file and the entry named."""
from __future__ import annotations

import json

import pytest

from libra_megatron.evaluation.tasks import load_caption_items, load_choice_items, load_items


def _karpathy(images) -> dict:
    return {"images": images}


def test_a_one_row_json_lines_file_is_one_item(tmp_path):
    captions = tmp_path / "heldout.jsonl"
    captions.write_text(json.dumps({"image": "0.png", "caption": "a dog"}) + "\n")
    (item,) = load_caption_items(str(captions))
    assert item.item_id == "0.png" and item.references == ["a dog"]
    choice = tmp_path / "pope.jsonl"
    choice.write_text(json.dumps({"question_id": 3, "image": "0.png", "text": "Is there a dog?", "label": "yes"}))
    (item,) = load_choice_items(str(choice))
    assert item.item_id == "3" and item.references == ["yes"]


def test_line_separators_inside_strings_do_not_split_a_row(tmp_path):
    rows = [{"image": "0.png", "caption": "a dog\u2028on the grass"}, {"image": "1.png", "caption": "a cat\x85"}]
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    items = load_caption_items(str(path))
    assert [i.references for i in items] == [["a dog\u2028on the grass"], ["a cat\x85"]]


def test_a_truncated_json_document_reports_its_own_position(tmp_path):
    images = [{"filename": f"{n}.png", "split": "test", "sentences": [{"raw": "a dog"}]} for n in range(3)]
    text = json.dumps(_karpathy(images), indent=2)
    path = tmp_path / "dataset_coco.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"dataset_coco.json: invalid JSON at line (\d+) column") as error:
        load_caption_items(str(path))
    assert "line 1 is not JSON" not in str(error.value)
    assert int(str(error.value).split("line ")[1].split()[0]) > 1
    broken = tmp_path / "broken.jsonl"  # JSON lines whose first row is fine: the row is named
    broken.write_text(json.dumps({"image": "0.png", "caption": "x"}) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"broken.jsonl: line 2 is not JSON"):
        load_caption_items(str(broken))


def test_broken_karpathy_entries_name_the_entry(tmp_path):
    path = tmp_path / "dataset_coco.json"
    good = {"filename": "0.png", "split": "test", "sentences": [{"raw": "a dog"}]}
    path.write_text(json.dumps(_karpathy([good, {"filename": "1.png", "split": "test", "sentences": []}])))
    with pytest.raises(ValueError, match=r"dataset_coco.json: images\[1\]: field 'sentences' is empty"):
        load_caption_items(str(path))
    path.write_text(json.dumps(_karpathy([good, "1.png"])))
    with pytest.raises(ValueError, match=r"dataset_coco.json: images\[1\]: a str, not an object"):
        load_caption_items(str(path))
    path.write_text(json.dumps(_karpathy([dict(good, sentences=["a dog"])])))
    with pytest.raises(ValueError, match=r"images\[0\].sentences\[0\]: a str, not an object"):
        load_caption_items(str(path))
    # an image without sentences outside the evaluated split is not read
    path.write_text(json.dumps(_karpathy([good, {"filename": "1.png", "split": "train", "sentences": []}])))
    assert [i.item_id for i in load_items("caption", str(path))] == ["0"]
