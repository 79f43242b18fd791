"""``tools/evaluate.py`` end to end on a tiny HF export (CPU): caption, vqa and choice; bad images skipped and
counted; a crashed run resumes without regenerating or double-scoring an item; two data-parallel ranks produce the
same predictions as one; a rerun with other settings into the same output is refused; an engine checkpoint is
converted on the fly, and the conversion is reused only for the same checkpoint and dtype."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from tests.hf_modeling.tiny import sentencepiece_export

FAST = ["--caption-metrics", "cider,bleu", "--caption-tokenizer", "simple", "--no-progress", "--device", "cpu",
        "--max-new-tokens", "3", "--batch-size", "2"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    out, tokenizer = sentencepiece_export(tmp, torch.float32)
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for n in range(5):
        Image.fromarray(rng.integers(0, 255, (30 + 7 * n, 40, 3), dtype=np.uint8)).save(images / f"{n}.png")
    (images / "corrupt.png").write_bytes(b"not a png at all")
    return tmp, out


def _run(argv):
    from tools.evaluate import main

    assert main(argv) == 0


def _caption_file(tmp) -> str:
    karpathy = {"images": [{"filepath": "images", "filename": f"{n}.png", "cocoid": 100 + n, "split": "test",
                            "sentences": [{"raw": "a noisy square picture"}, {"raw": "random coloured pixels"}]}
                           for n in range(5)]
                + [{"filepath": "images", "filename": "missing.png", "cocoid": 7, "split": "test",
                    "sentences": [{"raw": "gone"}]},
                   {"filepath": "images", "filename": "corrupt.png", "cocoid": 8, "split": "test",
                    "sentences": [{"raw": "broken"}]},
                   {"filepath": "images", "filename": "0.png", "cocoid": 9, "split": "train",
                    "sentences": [{"raw": "not evaluated"}]}]}
    path = tmp / "dataset_coco.json"
    path.write_text(json.dumps(karpathy))
    return str(path)


def _lines(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.fixture(scope="module")
def caption_run(export):
    """One uninterrupted single-process caption run (the reference of the resume and DP tests)."""
    tmp, model = export
    out = tmp / "caption"
    _run(["--task", "caption", "--data", _caption_file(tmp), "--model", model, "--output", str(out), *FAST])
    return out


def test_caption_end_to_end_with_bad_images_and_library_cider(caption_run):
    out = caption_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items"] == 7 and summary["scored"] == 5 and summary["skipped"] == 2
    assert summary["skipped_by_reason"] == {"missing image": 1, "corrupt image": 1}
    predictions = _lines(out / "predictions.jsonl")
    assert [p["id"] for p in predictions] == ["100", "101", "102", "103", "104", "7", "8"]
    # the summary's CIDEr is pycocoevalcap's on the same predictions
    from pycocoevalcap.cider.cider import Cider

    from libra_megatron.evaluation.scoring import simple_tokenize

    refs = {str(100 + n): ["a noisy square picture", "random coloured pixels"] for n in range(5)}
    res = simple_tokenize({p["id"]: [p["prediction"]] for p in predictions if "prediction" in p})
    assert summary["metrics"]["CIDEr"] == pytest.approx(Cider().compute_score(simple_tokenize(refs), res)[0])
    assert "| CIDEr |" in (out / "summary.md").read_text()


def test_vqa_and_choice_end_to_end(export):
    tmp, model = export
    vqa = tmp / "textvqa.json"
    vqa.write_text(json.dumps({"data": [{"question_id": n, "image_id": str(n), "question": "what is it?",
                                         "answers": ["noise"] * 10} for n in range(3)]}))
    _run(["--task", "vqa", "--data", str(vqa), "--image-root", str(tmp / "images"), "--image-pattern",
          "{image_id}.png", "--model", model, "--output", str(tmp / "vqa"), *FAST])
    summary = json.loads((tmp / "vqa" / "summary.json").read_text())
    assert summary["scored"] == 3 and 0.0 <= summary["metrics"]["accuracy"] <= 100.0
    choice = tmp / "pope.jsonl"
    rows = [{"question_id": 0, "image": "0.png", "text": "Is there a dog?", "label": "no"},
            {"question_id": 1, "image": "1.png", "question": "Which colour?", "options": ["red", "blue"], "answer": 1}]
    choice.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _run(["--task", "choice", "--data", str(choice), "--image-root", str(tmp / "images"), "--model", model,
          "--output", str(tmp / "choice"), *FAST])
    summary = json.loads((tmp / "choice" / "summary.json").read_text())
    assert summary["scored"] == 2 and {"accuracy", "unparsed", "yes_ratio"} <= set(summary["metrics"])


def test_a_crashed_run_resumes_without_regenerating_or_double_scoring(export, caption_run, monkeypatch):
    from libra_megatron.evaluation import runner

    tmp, model = export
    out = tmp / "resume"
    argv = ["--task", "caption", "--data", _caption_file(tmp), "--model", model, "--output", str(out), *FAST]
    want = {p["id"]: p for p in _lines(caption_run / "predictions.jsonl")}

    seen, original = [], runner.Generator.answer

    def crash_on_second_batch(self, items):
        if len(seen) == 2:
            raise KeyboardInterrupt("killed")
        seen.extend(i.item_id for i in items)
        return original(self, items)

    monkeypatch.setattr(runner.Generator, "answer", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _run(argv)
    rank_file = out / "predictions.rank0.jsonl"
    with open(rank_file, "a") as handle:  # a kill in the middle of a write leaves half a line
        handle.write('{"id": "102", "predic')
    assert not (out / "summary.json").exists()

    generated = []

    def counting(self, items):
        generated.extend(i.item_id for i in items)
        return original(self, items)

    monkeypatch.setattr(runner.Generator, "answer", counting)
    _run(argv)
    assert sorted(generated) == sorted(set(want) - set(seen)) and not set(generated) & set(seen)
    got = _lines(out / "predictions.jsonl")
    assert len(got) == len({p["id"] for p in got}) == 7
    assert {p["id"]: p for p in got} == want  # greedy: the same answers as the uninterrupted run
    assert json.loads((out / "summary.json").read_text())["scored"] == 5
    generated.clear()
    _run(argv)  # everything finished: nothing is generated again
    assert generated == []


def _dp_rank(argv):
    from tools.evaluate import main

    return main(argv)


def test_two_data_parallel_ranks_equal_one(export, caption_run):
    from tests.distributed import run_on_ranks

    tmp, model = export
    out = tmp / "dp2"
    argv = ["--task", "caption", "--data", _caption_file(tmp), "--model", model, "--output", str(out), *FAST]
    assert run_on_ranks(_dp_rank, world_size=2, args=(argv,)) == [0, 0]
    assert sorted(os.listdir(out)) == ["predictions.jsonl", "predictions.rank0.jsonl", "predictions.rank1.jsonl",
                                       "run.json", "summary.json", "summary.md"]
    assert _lines(out / "predictions.jsonl") == _lines(caption_run / "predictions.jsonl")


def test_a_rerun_with_other_settings_into_the_same_output_is_refused(export, caption_run):
    tmp, model = export
    settings = json.loads((caption_run / "run.json").read_text())
    assert settings["max_new_tokens"] == 3 and settings["template"] == "raw" and settings["do_sample"] is False
    before = (caption_run / "predictions.jsonl").read_bytes()
    argv = ["--task", "caption", "--data", _caption_file(tmp), "--model", model, "--output", str(caption_run), *FAST]
    with pytest.raises(ValueError, match=r"run.json: .*other settings \(max_new_tokens: 3 -> 5; prompt: None -> "
                                         r"'A photo of'\).*use a fresh --output"):
        _run(argv + ["--max-new-tokens", "5", "--prompt", "A photo of"])
    with pytest.raises(ValueError, match=r"do_sample: False -> True; seed: None -> 0"):
        _run(argv + ["--do-sample"])
    with pytest.raises(ValueError, match=r"template: 'raw' -> 'chat'"):
        _run(argv + ["--template", "chat"])
    other = tmp / "other_coco.json"
    other.write_text(open(_caption_file(tmp)).read())
    with pytest.raises(ValueError, match=r"other settings \(data: .*other_coco.json"):
        _run(["--task", "caption", "--data", str(other), "--model", model, "--output", str(caption_run), *FAST])
    assert (caption_run / "predictions.jsonl").read_bytes() == before
    _run(argv + ["--template", "raw", "--batch-size", "3"])  # the same settings spelled out, another batch size


def test_a_converted_export_is_reused_only_for_the_same_checkpoint_and_dtype(tmp_path, monkeypatch):
    from libra_megatron.evaluation import runner

    root = tmp_path / "ckpt"
    for iteration in (2, 4):
        (root / f"iter_{iteration:07d}").mkdir(parents=True)
        (root / f"iter_{iteration:07d}" / "metadata.json").write_text("{}")
    (root / "latest_checkpointed_iteration.txt").write_text("2\n")
    calls = []

    def fake_converter(command, **kwargs):  # writes what it was asked for into --output
        folder = command[command.index("--output") + 1]
        os.makedirs(folder)
        with open(os.path.join(folder, "config.json"), "w") as handle:
            json.dump({"dtype": command[command.index("--dtype") + 1], "conversion": len(calls)}, handle)
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="")

    monkeypatch.setattr(runner.subprocess, "run", fake_converter)
    out = tmp_path / "out"
    out.mkdir()
    options = runner.EvalOptions(task="caption", data="", model=str(root), output=str(out))

    def resolve(dtype="fp32"):
        folder = runner.resolve_model(options, 0, dtype)
        read = lambda name: json.loads((out / "hf_export" / name).read_text())  # noqa: E731
        assert folder == str(out / "hf_export")
        return read("config.json"), read("source.json")

    config, source = resolve()
    assert len(calls) == 1 and source["tracker"] == "2" and source["dtype"] == "fp32"
    assert source["checkpoint"] == os.path.realpath(root / "iter_0000002")
    assert resolve() == (config, source) and len(calls) == 1  # the same checkpoint and dtype: reused
    (root / "latest_checkpointed_iteration.txt").write_text("4\n")  # training saved a newer checkpoint
    config, source = resolve()
    assert len(calls) == 2 and config["conversion"] == 1 and source["checkpoint"].endswith("iter_0000004")
    config, source = resolve("bf16")
    assert len(calls) == 3 and config["dtype"] == "bf16" == source["dtype"]
    os.remove(out / "hf_export" / "source.json")  # an export without a record (an older version): converted again
    resolve("bf16")
    assert len(calls) == 4 and sorted(os.listdir(out)) == ["hf_export"]  # no temporary folder left behind
