"""A corpus with every kind of bad input: the job finishes, keeps the good samples, logs each bad one."""
import io
import json
import os
import tarfile

from PIL import Image

from libra_megatron.data.indexed import SampleReader
from libra_megatron.data.preprocess_job import PreprocessConfig, run_preprocessing
from libra_megatron.data.sidecar import read_sidecar
from tests.data.corpus import add_member, caption_json, image_bytes, make_image


def _png(width=40, height=30, seed=0):
    return image_bytes(make_image(width, height, "RGB", seed), "PNG")


def _jpeg(width=60, height=40, seed=1):
    return image_bytes(make_image(width, height, "RGB", seed), "JPEG")


def _read_rejects(prefix):
    with open(prefix + ".rejects.jsonl") as handle:
        return [json.loads(line) for line in handle]


def test_bad_webdataset_shards(tmp_path, sp_model_path):
    good_caption = caption_json("a dog")
    with tarfile.open(tmp_path / "shard-0.tar", "w") as archive:
        add_member(archive, "good1.png", _png(seed=0))
        add_member(archive, "good1.json", good_caption)
        add_member(archive, "corrupt.jpg", b"this is not an image at all" * 10)
        add_member(archive, "corrupt.json", good_caption)
        add_member(archive, "truncated.jpg", _jpeg()[:300])
        add_member(archive, "truncated.json", good_caption)
        add_member(archive, "empty.jpg", b"")
        add_member(archive, "empty.json", good_caption)
        add_member(archive, "bomb.png", image_bytes(Image.new("L", (1200, 1000)), "PNG"))
        add_member(archive, "bomb.json", good_caption)
        add_member(archive, "misnamed.jpg", _png(seed=2))  # PNG data under a .jpg name
        add_member(archive, "misnamed.json", good_caption)
        add_member(archive, "nocaption.png", _png(seed=3))
        add_member(archive, "nocaption.json", json.dumps({"url": "x"}).encode())
        add_member(archive, "emptycaption.png", _png(seed=4))
        add_member(archive, "emptycaption.json", caption_json("  ** ~ "))
        add_member(archive, "../escape.png", _png(seed=5))
        add_member(archive, "../escape.json", good_caption)
        add_member(archive, "/abs/path.png", _png(seed=6))
        link = tarfile.TarInfo("linked.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
        add_member(archive, "linked.json", good_caption)
        add_member(archive, "noimage.json", good_caption)
        add_member(archive, "badjson.png", _png(seed=7))
        add_member(archive, "badjson.json", b"{not json")
        add_member(archive, "good2.jpg", _jpeg(seed=8))
        add_member(archive, "good2.txt", b"A Cat")
    (tmp_path / "shard-1.tar").write_bytes(b"garbage, not a tar archive" * 40)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        add_member(archive, "ok.png", _png(seed=9))
        add_member(archive, "ok.json", good_caption)
        add_member(archive, "cut.png", _png(200, 200, seed=10))
        add_member(archive, "cut.json", good_caption)
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as archive:
        cut_at = archive.getmember("cut.png").offset_data + 100
    (tmp_path / "shard-2.tar").write_bytes(buffer.getvalue()[:cut_at])  # ends inside cut.png
    prefix = str(tmp_path / "out" / "bad")
    config = PreprocessConfig(
        input_format="webdataset", inputs=[str(tmp_path / f"shard-{i}.tar") for i in range(3)], output_prefix=prefix,
        tokenizer_model=str(sp_model_path), tiny_image_tokenizer_seed=0, workers=2, batch_size=4,
        max_image_pixels=1_000_000, progress=False, device="cpu")
    summary = run_preprocessing(config)

    reader = SampleReader(prefix)
    assert len(reader) == 3 and summary["dataset"]["samples"] == 3  # good1, good2, ok
    rejects = {(os.path.basename(r["source"]), r["key"]): r["reason"] for r in _read_rejects(prefix)}
    assert rejects == {
        ("shard-0.tar", "corrupt"): "corrupt_image",
        ("shard-0.tar", "truncated"): "truncated_image",
        ("shard-0.tar", "empty"): "empty_file",
        ("shard-0.tar", "bomb"): "decompression_bomb",
        ("shard-0.tar", "misnamed"): "wrong_extension",
        ("shard-0.tar", "nocaption"): "missing_caption",
        ("shard-0.tar", "emptycaption"): "empty_caption",
        ("shard-0.tar", "../escape"): "unsafe_member_path",
        ("shard-0.tar", "/abs/path"): "unsafe_member_path",
        ("shard-0.tar", "linked"): "unsafe_member_path",
        ("shard-0.tar", "noimage"): "missing_image",
        ("shard-0.tar", "badjson"): "bad_record",
        ("shard-1.tar", ""): "unreadable_shard",
        ("shard-2.tar", "cut"): "truncated_shard",
    }
    assert all(r["detail"] for r in _read_rejects(prefix))
    meta = read_sidecar(prefix)
    assert meta["counts"]["rejected"] == 14 and meta["counts"]["rejected_by_reason"]["unsafe_member_path"] == 3
    assert summary["rejected_by_reason"] == meta["counts"]["rejected_by_reason"]


def test_bad_image_folder_records(tmp_path, sp_model_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes(_png())
    (images / "a_dir.jpg").mkdir()  # exists but cannot be read as a file
    (images / "notes.txt").write_text("hello")
    lines = [
        json.dumps({"image": "good.png", "caption": "A Dog"}),
        json.dumps({"image": "missing.png", "caption": "a cat"}),
        json.dumps({"image": "a_dir.jpg", "caption": "a cat"}),
        json.dumps({"image": "notes.txt", "caption": "a cat"}),
        json.dumps({"caption": "no image field"}),
        "{broken json",
        json.dumps({"image": "good.png"}),
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    prefix = str(tmp_path / "out" / "folder")
    config = PreprocessConfig(
        input_format="image-folder", inputs=[str(tmp_path / "captions.jsonl")], image_root=str(images),
        output_prefix=prefix, tokenizer_model=str(sp_model_path), tiny_image_tokenizer_seed=0, workers=0,
        chunk_size=4, progress=False, device="cpu")
    run_preprocessing(config)
    assert len(SampleReader(prefix)) == 1
    rejects = {r["key"]: r["reason"] for r in _read_rejects(prefix)}
    assert rejects == {"line2": "missing_image", "line3": "not_regular_file", "line4": "wrong_extension",
                       "line5": "missing_image", "line6": "bad_record", "line7": "missing_caption"}
