"""SIGKILL the preprocessing job mid-run, rerun it: the output is byte-identical to an uninterrupted run (also
from the leftovers a kill can leave inside a chunk commit); so is a run split over two ranks and merged."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from libra_megatron.data.preprocess_job import PreprocessConfig, run_preprocessing
from tests.data.corpus import CAPTIONS, IMAGE_SPECS, write_images

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUTPUT_FILES = (".bin", ".idx", ".json", ".rejects.jsonl")


@pytest.fixture(scope="module")
def folder_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_corpus")
    write_images(str(root / "images"))
    names = [spec[0] for spec in IMAGE_SPECS][:6] + ["missing.png"]
    with open(root / "captions.jsonl", "w") as handle:
        for name in names:
            handle.write(json.dumps({"image": name, "caption": CAPTIONS.get(name, ("a cat",))[0]}) + "\n")
    return root


def _args(corpus, prefix, sp_model_path, *extra):
    return ["--input-format", "image-folder", "--input", str(corpus / "captions.jsonl"), "--image-root",
            str(corpus / "images"), "--output-prefix", prefix, "--tokenizer-model", str(sp_model_path),
            "--tiny-image-tokenizer", "0", "--chunk-size", "2", "--batch-size", "2", "--workers", "1",
            "--no-progress", "--device", "cpu", *extra]


def _run_inline(corpus, prefix, sp_model_path, **kwargs):
    config = PreprocessConfig(input_format="image-folder", inputs=[str(corpus / "captions.jsonl")],
                              image_root=str(corpus / "images"), output_prefix=prefix,
                              tokenizer_model=str(sp_model_path), tiny_image_tokenizer_seed=0, chunk_size=2,
                              batch_size=2, workers=1, progress=False, device="cpu")
    for key, value in kwargs.items():
        setattr(config, key, value)
    return run_preprocessing(config)


def _spawn(args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "preprocess_images.py"), *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _outputs(prefix):
    out = {}
    for ext in OUTPUT_FILES:
        with open(prefix + ext, "rb") as handle:
            out[ext] = handle.read()
    return out


@pytest.fixture(scope="module")
def reference(folder_corpus, tmp_path_factory, sp_model_path):
    """An uninterrupted single-process run without decode workers."""
    prefix = str(tmp_path_factory.mktemp("reference") / "ds")
    _run_inline(folder_corpus, prefix, sp_model_path, workers=0)
    return _outputs(prefix)


def test_sigkill_mid_run_then_rerun_is_byte_identical(folder_corpus, tmp_path, sp_model_path, reference):
    prefix = str(tmp_path / "killed" / "ds")
    parts = prefix + ".parts"
    # a real SIGKILL of the tool as soon as its first chunk is committed (it is then inside chunk 1)
    process = _spawn(_args(folder_corpus, prefix, sp_model_path))
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(parts, "chunk-00000000.json")):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "first chunk never committed"
        time.sleep(0.01)
    import psutil

    workers = psutil.Process(process.pid).children(recursive=True)
    assert workers, "the job runs with one decode worker"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    _, alive = psutil.wait_procs(workers, timeout=30)  # a killed job leaves no decode worker behind
    assert not alive, f"orphaned decode workers: {alive}"
    assert not os.path.exists(prefix + ".json")
    # the states a kill can leave at the other points of a chunk commit:
    # chunk 2 half-written under temporary names; chunk 3 renamed in but without its commit marker
    with open(os.path.join(parts, ".tmp-chunk-00000002.bin"), "wb") as handle:
        handle.write(b"\x00" * 1000)
    with open(os.path.join(parts, "chunk-00000003.bin"), "wb") as handle:
        handle.write(b"partial")
    with open(os.path.join(parts, "chunk-00000003.idx"), "wb") as handle:
        handle.write(b"partial")
    # the rerun (with decode workers) skips the committed chunk(s), redoes the rest, merges
    summary = _run_inline(folder_corpus, prefix, sp_model_path)
    assert summary["chunks_resumed"] >= 1
    assert _outputs(prefix) == reference
    assert not [n for n in os.listdir(parts) if n.startswith(".tmp") or ".tmp-" in n]
    # a committed part whose size no longer matches its record is redone, not trusted
    with open(os.path.join(parts, "chunk-00000001.bin"), "ab") as handle:
        handle.write(b"junk")
    summary = _run_inline(folder_corpus, prefix, sp_model_path)
    assert summary["chunks_resumed"] == 3
    assert _outputs(prefix) == reference


def test_two_ranks_and_merge_equal_one_rank(folder_corpus, tmp_path, sp_model_path, reference):
    prefix = str(tmp_path / "ranks" / "ds")
    summary = _run_inline(folder_corpus, prefix, sp_model_path, rank=1, world_size=2, workers=0)
    assert "dataset" not in summary and not os.path.exists(prefix + ".bin")
    with pytest.raises(RuntimeError, match=r"2 chunk\(s\) not finished \(0, 2\)"):
        _run_inline(folder_corpus, prefix, sp_model_path, merge="only", workers=0)
    _run_inline(folder_corpus, prefix, sp_model_path, rank=0, world_size=2, workers=0)
    with pytest.raises(ValueError, match="different settings"):
        _run_inline(folder_corpus, prefix, sp_model_path, merge="only", pixel_format="png", workers=0)
    summary = _run_inline(folder_corpus, prefix, sp_model_path, merge="only", workers=0)
    assert summary["dataset"]["samples"] == 6 and summary["dataset"]["rejected"] == 1
    assert _outputs(prefix) == reference
