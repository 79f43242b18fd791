"""tools/reconstruct_images.py and tools/convert_vision_tokenizer.py run end to end on the tiny tokenizer."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 256, (50, 20), dtype=np.uint8)).save(folder / "tall.jpg")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def test_reconstruct_grid_and_per_image(images, tmp_path, capsys):
    tool = _tool("reconstruct_images")
    grid = tmp_path / "out" / "grid.png"
    tool.main([str(images), "--tiny", "0", "--out", str(grid), "--device", "cpu", "--batch-size", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1]["images"] == 2 and lines[-1]["skipped"] == [str(images / "broken.jpg")]
    assert all(line["psnr_db"] > 0 and len(line["distinct_codes"]) == 2 for line in lines[:-1])
    assert Image.open(grid).size == (336 * 2 + 4, 336 * 2 + 4)
    per = tmp_path / "per"
    tool.main([str(images / "wide.png"), "--tiny", "0", "--out", str(per), "--per-image", "--device", "cpu"])
    assert [Image.open(per / f).size for f in os.listdir(per)] == [(336 * 2 + 4, 336)]


def test_convert_tiny_and_check_image(images, tmp_path, capsys):
    tool = _tool("convert_vision_tokenizer")
    out = tmp_path / "tok"
    tool.main(["--tiny", "0", "--out", str(out), "--check-image", str(images / "wide.png")])
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["check_image_ids_equal"] and report["clip_blocks"] == 22 and report["feature_size"] == 128
    assert sorted(os.listdir(out)) == ["vision_tokenizer.safetensors", "vision_tokenizer_config.json"]
