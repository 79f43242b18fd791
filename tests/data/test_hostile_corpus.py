"""The hostile corpus of tests/data/hostile.py in every layout: every good sample kept, every bad one rejected
with its specific reason and file/line/key, nothing opened outside the roots (nor any pipe, device, folder or
oversized file), no job hangs (each run under a SIGALRM deadline), and a run whose decode workers die or hang
is finished by retries and, rerun, gives the bytes of a clean run."""
from __future__ import annotations

import builtins
import contextlib
import importlib.util
import json
import os
import signal
import time

import pytest

from libra_megatron.data.indexed import SampleReader
from libra_megatron.data.preprocess_job import PreprocessConfig, run_preprocessing
from libra_megatron.data.preprocess_worker import FAULT_FILE_ENV
from libra_megatron.data.samples import PieceKind
from tests.data import hostile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUTPUT_FILES = (".bin", ".idx", ".json", ".rejects.jsonl")


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""
    def expired(signum, frame):
        raise TimeoutError(f"the job did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hostile"))
    paths = hostile.build_image_root(root)
    files = {"jsonl": hostile.write_jsonl(root), "csv": hostile.write_csv(root), "coco": hostile.write_coco(root),
             "llava": hostile.write_llava(root)}
    return {"root": root, "canary": paths["canary"], "files": files}


def _config(prefix, sp_model_path, input_format, inputs, image_root=None, **overrides) -> PreprocessConfig:
    config = PreprocessConfig(input_format=input_format, inputs=list(inputs), output_prefix=prefix,
                              image_root=image_root, tokenizer_model=str(sp_model_path), tiny_image_tokenizer_seed=0,
                              workers=0, batch_size=8, chunk_size=8, progress=False, device="cpu",
                              max_image_bytes=hostile.MAX_IMAGE_BYTES, max_caption_tokens=hostile.MAX_CAPTION_TOKENS)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _rejects(prefix):
    with open(prefix + ".rejects.jsonl") as handle:
        return [json.loads(line) for line in handle]


def _outputs(prefix):
    return {ext: open(prefix + ext, "rb").read() for ext in OUTPUT_FILES}


@contextlib.contextmanager
def recorded_opens():
    """Every path given to ``open`` / ``os.open`` in this process (inline workers), resolved."""
    opened, real_open, real_os_open = [], builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    def spy_os_open(path, *args, **kwargs):
        opened.append(os.path.realpath(path))
        return real_os_open(path, *args, **kwargs)

    builtins.open, os.open = spy_open, spy_os_open
    try:
        yield opened
    finally:
        builtins.open, os.open = real_open, real_os_open


def _never_opened(opened, corpus):
    images = os.path.join(corpus["root"], "images")
    forbidden = {os.path.realpath(corpus["canary"]), "/dev/zero"} | {
        os.path.realpath(os.path.join(images, name)) for name in ("pipe.png", "folder.png", "big.png")}
    assert not forbidden & set(opened), sorted(forbidden & set(opened))
    assert not [p for p in opened if p.startswith(os.path.realpath(os.path.join(corpus["root"], "outside")))]


def _caption_lengths(prefix):
    reader = SampleReader(prefix)
    return [len(array) for i in range(len(reader)) for kind, array in reader.pieces(i) if kind == PieceKind.TEXT_TARGET]


@pytest.mark.parametrize("layout", ["jsonl", "csv", "coco", "llava"])
def test_annotation_layouts(layout, corpus, tmp_path, sp_model_path):
    path, expected = corpus["files"][layout]
    input_format = {"jsonl": "image-folder", "csv": "image-folder", "coco": "coco-karpathy", "llava": "llava"}[layout]
    prefix = str(tmp_path / layout)
    with deadline(120), recorded_opens() as opened:
        summary = run_preprocessing(_config(prefix, sp_model_path, input_format, [path],
                                            os.path.join(corpus["root"], "images")))
    _never_opened(opened, corpus)
    rejects = _rejects(prefix)
    got = {r["key"]: r["reason"] for r in rejects}
    assert len(got) == len(rejects)
    want = {key: reason for key, reason in expected.items() if reason != hostile.KEPT}
    assert got == want
    kept = sum(reason == hostile.KEPT for reason in expected.values())
    assert summary["dataset"]["samples"] == len(SampleReader(prefix)) == kept
    for reject in rejects:  # file and line in every entry
        assert reject["source"] == path and reject["detail"].startswith("line "), reject
    if layout != "llava":  # the 200,000-character caption without a space is held to the token bound
        assert max(_caption_lengths(prefix)) == hostile.MAX_CAPTION_TOKENS


def test_webdataset_shards_plain_and_gzip(tmp_path, sp_model_path):
    shards, kept, rejected = [], [], []
    for suffix, compress in ((".tar", False), (".tar.gz", True)):
        paths, shard_kept, shard_rejected = hostile.write_shards(str(tmp_path), compress)
        shards += paths
        kept += shard_kept
        rejected += [(shard + suffix, key, reason) for shard, key, reason in shard_rejected]
    prefix = str(tmp_path / "out" / "wds")
    with deadline(180):
        summary = run_preprocessing(_config(prefix, sp_model_path, "webdataset", shards))
    rejects = _rejects(prefix)
    assert sorted((os.path.basename(r["source"]), r["key"], r["reason"]) for r in rejects) == sorted(rejected)
    assert summary["dataset"]["samples"] == len(kept)
    details = {(os.path.basename(r["source"]), r["key"]): r["detail"] for r in rejects}
    for suffix in (".tar", ".tar.gz"):
        assert "last good key 's11'" in details[("nomarker" + suffix, "s11")]
        assert "last good key 's15'" in details[("cutdata" + suffix, "s16")]
    assert max(_caption_lengths(prefix)) == hostile.MAX_CAPTION_TOKENS


def _load_tool():
    spec = importlib.util.spec_from_file_location("preprocess_images_tool", os.path.join(ROOT, "tools",
                                                                                          "preprocess_images.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_zero_kept_samples_fails_and_writes_no_dataset(corpus, tmp_path, sp_model_path, capsys):
    captions = tmp_path / "all_bad.jsonl"
    captions.write_text(json.dumps({"image": "../outside/canary.png", "caption": "x"}) + "\n"
                        + json.dumps({"image": "nowhere.png", "caption": "x"}) + "\n")
    prefix = str(tmp_path / "none")
    code = _load_tool().main(["--input-format", "image-folder", "--input", str(captions), "--image-root",
                              os.path.join(corpus["root"], "images"), "--output-prefix", prefix, "--tokenizer-model",
                              str(sp_model_path), "--tiny-image-tokenizer", "0", "--workers", "0", "--no-progress",
                              "--device", "cpu"])
    assert code != 0
    assert "no sample kept: all 2 record(s)" in capsys.readouterr().err
    assert not [ext for ext in (".bin", ".idx", ".json") if os.path.exists(prefix + ext)]


def test_dying_and_hanging_workers_and_a_pipe_cannot_stall_or_lose_records(corpus, tmp_path, sp_model_path,
                                                                           monkeypatch):
    path, expected = corpus["files"]["jsonl"]
    images = os.path.join(corpus["root"], "images")
    reference = str(tmp_path / "clean" / "ds")
    with deadline(120):
        run_preprocessing(_config(reference, sp_model_path, "image-folder", [path], images))
    # good0 kills its worker on both tries; good2 hangs its worker once (the retry succeeds); pipe.png is a FIFO
    faults = tmp_path / "faults"
    faults.write_text("good0 kill 2\ngood2 hang 1\n")
    monkeypatch.setenv(FAULT_FILE_ENV, str(faults))
    prefix = str(tmp_path / "faulty" / "ds")
    started = time.monotonic()
    with deadline(120):
        summary = run_preprocessing(_config(prefix, sp_model_path, "image-folder", [path], images, workers=2,
                                            worker_timeout_s=4.0))
    assert time.monotonic() - started >= 4.0  # the hang was waited out once, not for ever
    assert faults.read_text().split() == ["good0", "kill", "0", "good2", "hang", "0"]
    assert summary["workers_replaced"] == 3 and summary["retryable"] == 1
    crash = [r for r in _rejects(prefix) if r["reason"] == "worker_crash"]
    assert [r["key"] for r in crash] == ["line1"] and "a rerun retries" in crash[0]["detail"]
    assert summary["dataset"]["samples"] == len(SampleReader(reference)) - 1
    # the rerun retries only the non-final chunk (no fault now) and matches the clean run byte for byte
    monkeypatch.delenv(FAULT_FILE_ENV)
    with deadline(120):
        summary = run_preprocessing(_config(prefix, sp_model_path, "image-folder", [path], images, workers=2,
                                            worker_timeout_s=4.0))
    assert summary["chunks_resumed"] == summary["chunks"] - 1 and summary["retryable"] == 0
    assert _outputs(prefix) == _outputs(reference)
