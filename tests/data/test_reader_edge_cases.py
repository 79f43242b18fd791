"""Edge cases of the preprocessing readers and workers: a missing shard is an argument error, a shard I/O error is
retried by the next run, short reads are not the end of a file, a CSV header that is not UTF-8 is refused, the
annotation keys are part of the resume fingerprint, and a send to an already-dead idle worker is no attempt."""
from __future__ import annotations

import errno
import json
import os
import signal
import tarfile

import pytest

from libra_megatron.data.preprocess_job import PreprocessConfig, run_preprocessing
from libra_megatron.data.sources import build_source
from tests.data.corpus import caption_json, image_bytes, make_image, write_shard


def _png(seed: int) -> bytes:
    return image_bytes(make_image(48, 40, "RGB", seed), "PNG")


def _config(prefix, sp_model_path, input_format, inputs, **overrides) -> PreprocessConfig:
    config = PreprocessConfig(input_format=input_format, inputs=list(inputs), output_prefix=prefix,
                              tokenizer_model=str(sp_model_path), tiny_image_tokenizer_seed=0, workers=0,
                              batch_size=8, chunk_size=8, progress=False, device="cpu")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_a_missing_webdataset_shard_is_an_argument_error(tmp_path):
    write_shard(str(tmp_path / "real.tar"), [("a", {"png": _png(0), "json": caption_json("a dog")})])
    with pytest.raises(FileNotFoundError, match="nowhere.tar"):
        build_source("webdataset", [str(tmp_path / "real.tar"), str(tmp_path / "nowhere.tar")])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        build_source("webdataset", [str(tmp_path / "none-*.tar")])
    assert len(build_source("webdataset", [str(tmp_path / "real.tar")]).chunks()) == 1


def test_a_shard_io_error_is_retryable_and_the_rerun_rereads_the_shard(tmp_path, sp_model_path, monkeypatch):
    samples = [(f"s{n}", {"png": _png(n), "json": caption_json(f"sample {n}")}) for n in range(12)]
    write_shard(str(tmp_path / "shard.tar"), samples)
    assert os.path.getsize(tmp_path / "shard.tar") > 3 * tarfile.RECORDSIZE
    prefix = str(tmp_path / "out" / "ds")

    class FailingFile(tarfile._LowLevelFile):  # the file system fails on the third read (EIO)
        reads = 0

        def read(self, size):
            FailingFile.reads += 1
            if FailingFile.reads == 3:
                raise OSError(errno.EIO, "Input/output error")
            return super().read(size)

    monkeypatch.setattr(tarfile, "_LowLevelFile", FailingFile)
    summary = run_preprocessing(_config(prefix, sp_model_path, "webdataset", [str(tmp_path / "shard.tar")]))
    assert summary["retryable"] == 1 and summary["rejected_by_reason"] == {"shard_io_error": 1}
    assert 0 < summary["dataset"]["samples"] < len(samples)
    with open(prefix + ".rejects.jsonl") as handle:
        (reject,) = [json.loads(line) for line in handle]
    assert "Input/output error" in reject["detail"] and "a rerun retries this shard" in reject["detail"]
    monkeypatch.undo()  # the file system is back: the chunk was not final, so it is read again
    summary = run_preprocessing(_config(prefix, sp_model_path, "webdataset", [str(tmp_path / "shard.tar")]))
    assert summary["chunks_resumed"] == 0 and summary["retryable"] == 0
    assert summary["dataset"]["samples"] == len(samples) and summary["dataset"]["rejected"] == 0


def test_short_reads_are_not_the_end_of_the_file(tmp_path, monkeypatch):
    from libra_megatron.data import safe_read

    data = bytes(range(256)) * 40
    (tmp_path / "image.png").write_bytes(data)
    real_read = os.read
    monkeypatch.setattr(safe_read.os, "read", lambda fd, size: real_read(fd, min(size, 7)))
    assert safe_read.read_image_file([str(tmp_path / "image.png")], str(tmp_path), 1 << 20) == data
    with pytest.raises(safe_read.SampleError, match="image_too_large"):
        safe_read.read_image_file([str(tmp_path / "image.png")], str(tmp_path), len(data) - 1)


def test_a_csv_header_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_bytes(b"image,capt\xe9ion\ngood.png,a dog\nother.png,a cat\n")
    source = build_source("image-folder", [str(path)], str(tmp_path))
    with pytest.raises(ValueError, match=r"captions.csv: line 1: the CSV header is not UTF-8"):
        source.chunks()


def test_the_annotation_keys_are_part_of_the_resume_fingerprint(tmp_path, sp_model_path):
    (tmp_path / "a.png").write_bytes(_png(0))
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": "a.png", "caption": "a dog", "text": "a cat"}) + "\n")
    prefix = str(tmp_path / "out" / "ds")
    run_preprocessing(_config(prefix, sp_model_path, "image-folder", [str(captions)]))
    with pytest.raises(ValueError, match=r"different settings \(changed: \['source'\]\)"):
        run_preprocessing(_config(prefix, sp_model_path, "image-folder", [str(captions)], caption_key="text"))
    assert build_source("image-folder", [str(captions)], caption_key="text").describe()["caption_key"] == "text"


def test_a_send_to_a_dead_idle_worker_is_no_attempt(tmp_path, text_tokenizer, monkeypatch):
    """The idle worker was killed (OOM killer) before it got the record; the record then kills one fresh worker:
    one real crash, retried once, so the record is prepared, not rejected."""
    from libra_megatron.data.preprocess_worker import FAULT_FILE_ENV, Prepared, PrepareSettings
    from libra_megatron.data.records import RawRecord
    from libra_megatron.data.workers import WorkerPool, ordered_results

    (tmp_path / "victim.png").write_bytes(_png(0))
    faults = tmp_path / "faults"
    faults.write_text("victim kill 1\n")
    monkeypatch.setenv(FAULT_FILE_ENV, str(faults))
    settings = PrepareSettings(text_tokenizer, "webp")
    pool = WorkerPool(1, settings, timeout_s=120)
    try:
        idle = pool.workers[0].process
        os.kill(idle.pid, signal.SIGKILL)
        idle.join(timeout=30)
        record = RawRecord(source="captions.jsonl", key="line1", kind="pretrain", image_name="victim.png",
                           image_paths=(str(tmp_path / "victim.png"),), image_root=str(tmp_path), caption="a dog")
        results = list(ordered_results([record], pool, 4, settings))
        replaced = pool.replaced
    finally:
        pool.close()
    assert faults.read_text().split() == ["victim", "kill", "0"]  # the record did kill one worker
    assert len(results) == 1 and isinstance(results[0], Prepared), results
    assert replaced == 2  # the dead idle worker and the one the record killed
