"""A hostile corpus, generated per test session: every failure class of ``docs/design.md#preprocessing-failure-classes``
in the folder (jsonl / csv), COCO-Karpathy, LLaVA and webdataset (plain + gzip) layouts, with the verdict the tool
must reach on each record (``EXPECTED[layout] = {key: reason or KEPT}``).

Outside the image root lies a *canary* image, reachable by ``..``, by an absolute path and by a symbolic link:
it must never be opened.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from typing import Dict, List, Tuple

from tests.data.corpus import add_member, caption_json, image_bytes, make_image

KEPT = "kept"
MAX_IMAGE_BYTES = 20_000  # the tests run with this --max-image-bytes
MAX_CAPTION_TOKENS = 12
LONG_CAPTION = "x" * 200_000  # one "word": only the token bound holds it
BAD_UTF8 = b"\xe9t\xe9"  # latin-1 "ete"


def _png(seed: int, width: int = 24, height: int = 20) -> bytes:
    return image_bytes(make_image(width, height, "RGB", seed), "PNG")


def _big_png() -> bytes:
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, size=(120, 120, 3), dtype=np.uint8)
    data = image_bytes(Image.fromarray(noise, "RGB"), "PNG")
    assert len(data) > MAX_IMAGE_BYTES
    return data


def build_image_root(root: str) -> Dict[str, str]:
    """``root/images`` with good images, links, a pipe, a folder and an oversized file; ``root/outside`` with the
    canary. Returns name -> relative path (for annotation entries)."""
    images, outside = os.path.join(root, "images"), os.path.join(root, "outside")
    os.makedirs(os.path.join(images, "sub"), exist_ok=True)
    os.makedirs(outside, exist_ok=True)
    for seed in range(3):
        with open(os.path.join(images, f"good{seed}.png"), "wb") as handle:
            handle.write(_png(seed))
    with open(os.path.join(images, "big.png"), "wb") as handle:
        handle.write(_big_png())
    with open(os.path.join(outside, "canary.png"), "wb") as handle:
        handle.write(_png(9))
    os.symlink(os.path.join(outside, "canary.png"), os.path.join(images, "link_out.png"))
    os.symlink("../good0.png", os.path.join(images, "sub", "link_in.png"))  # relative link inside the root: fine
    os.symlink("/dev/zero", os.path.join(images, "zero.png"))  # a device: outside the root anyway
    os.mkfifo(os.path.join(images, "pipe.png"))
    os.makedirs(os.path.join(images, "folder.png"))
    return {"canary": os.path.join(outside, "canary.png")}


# (key suffix, image path, caption, expected verdict) of the path/file classes, shared by the annotation layouts
def _image_cases(root: str) -> List[Tuple[str, object, object, str]]:
    return [
        ("good0", "good0.png", "A Dog", KEPT),
        ("good1", "sub/link_in.png", "a cat", KEPT),
        ("longcaption", "good2.png", LONG_CAPTION, KEPT),
        ("dotdot", "../outside/canary.png", "a cat", "unsafe_path"),
        ("absolute", os.path.join(root, "outside", "canary.png"), "a cat", "unsafe_path"),
        ("linkout", "link_out.png", "a cat", "unsafe_path"),
        ("device", "zero.png", "a cat", "unsafe_path"),
        ("pipe", "pipe.png", "a cat", "not_regular_file"),
        ("folder", "folder.png", "a cat", "not_regular_file"),
        ("big", "big.png", "a cat", "image_too_large"),
        ("missing", "nowhere.png", "a cat", "missing_image"),
        ("captionnumber", "good1.png", 42, "bad_record"),
        ("imagelist", ["good1.png"], "a cat", "bad_record"),
    ]


def write_jsonl(root: str) -> Tuple[str, Dict[str, str]]:
    """captions.jsonl with a BOM, one non-UTF-8 line and one broken line; keys are ``lineN``."""
    lines: List[bytes] = []
    expected: Dict[str, str] = {}
    for _, image, caption, verdict in _image_cases(root):
        lines.append(json.dumps({"image": image, "caption": caption}).encode())
        expected[f"line{len(lines)}"] = verdict
    lines.append(b'{"image": "good1.png", "caption": "caf' + BAD_UTF8 + b'"}')
    expected[f"line{len(lines)}"] = "bad_record"
    lines.append(b"{broken json")
    expected[f"line{len(lines)}"] = "bad_record"
    path = os.path.join(root, "captions.jsonl")
    with open(path, "wb") as handle:
        handle.write(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # the BOM must not lose line 1
    return path, expected


def write_csv(root: str) -> Tuple[str, Dict[str, str]]:
    """captions.csv with a BOM before the header and a non-UTF-8 row; keys are ``rowN`` (the line number)."""
    rows: List[bytes] = [b"image,caption"]
    expected: Dict[str, str] = {}
    for _, image, caption, verdict in _image_cases(root):
        if not isinstance(image, str) or not isinstance(caption, str):
            continue  # CSV fields are always text
        rows.append(f"{image},{caption[:100_000]}".encode())  # the csv module caps a field at 128 KiB
        expected[f"row{len(rows)}"] = verdict
    rows.append(b"good1.png,caf" + BAD_UTF8)
    expected[f"row{len(rows)}"] = "bad_record"
    rows.append(b"good1.png,a,b,too many fields")
    expected[f"row{len(rows)}"] = "bad_record"
    path = os.path.join(root, "captions.csv")
    with open(path, "wb") as handle:
        handle.write(b"\xef\xbb\xbf" + b"\n".join(rows) + b"\n")
    return path, expected


def _json_list(entries: List[bytes]) -> bytes:
    return b"\xef\xbb\xbf[\n" + b",\n".join(entries) + b"\n]\n"


def write_coco(root: str) -> Tuple[str, Dict[str, str]]:
    """COCO-Karpathy json (BOM, one entry with bytes that are not UTF-8); keys are entry indices."""
    entries: List[bytes] = []
    expected: Dict[str, str] = {}
    for _, image, caption, verdict in _image_cases(root):
        expected[str(len(entries))] = verdict
        entries.append(json.dumps({"image": image, "caption": caption}).encode())
    expected[str(len(entries))] = "bad_record"
    entries.append(b'{"image": "good1.png", "caption": "caf' + BAD_UTF8 + b'"}')
    expected[str(len(entries))] = "bad_record"
    entries.append(b'"not an object"')
    index = len(entries)
    expected[f"{index}.0"], expected[f"{index}.1"] = KEPT, "bad_record"
    entries.append(json.dumps({"image": "good0.png", "caption": ["two captions", ["not", "text"]]}).encode())
    expected[str(len(entries))] = "missing_caption"
    entries.append(json.dumps({"image": "good0.png", "caption": []}).encode())
    path = os.path.join(root, "coco.json")
    with open(path, "wb") as handle:
        handle.write(_json_list(entries))
    return path, expected


def write_llava(root: str) -> Tuple[str, Dict[str, str]]:
    """LLaVA json with the image cases as conversations, typed-field errors and a non-UTF-8 entry."""
    entries: List[bytes] = []
    expected: Dict[str, str] = {}

    def conversation(text: str) -> list:
        return [{"from": "human", "value": "<image>\n" + text}, {"from": "gpt", "value": "yes"}]

    for name, image, caption, verdict in _image_cases(root):
        if not isinstance(caption, str) or name == "longcaption":
            continue
        expected[name] = verdict
        entries.append(json.dumps({"id": name, "image": image, "conversations": conversation(caption)}).encode())
    expected["textonly"] = KEPT
    entries.append(json.dumps({"id": "textonly", "conversations": [{"from": "human", "value": "hi"},
                                                                   {"from": "gpt", "value": "hello"}]}).encode())
    expected["turnnumber"] = "bad_record"
    entries.append(json.dumps({"id": "turnnumber", "image": "good0.png",
                               "conversations": [{"from": "human", "value": 7}]}).encode())
    expected["convstring"] = "bad_record"
    entries.append(json.dumps({"id": "convstring", "image": "good0.png", "conversations": "hello"}).encode())
    expected["latin1"] = "bad_record"
    entries.append(b'{"id": "latin1", "image": "good0.png", "conversations": [{"from": "human", "value": "caf'
                   + BAD_UTF8 + b'"}]}')
    path = os.path.join(root, "llava.json")
    with open(path, "wb") as handle:
        handle.write(_json_list(entries))
    return path, expected


def _tar_bytes(samples: List[Tuple[str, bytes]], end_marker: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in samples:
            add_member(archive, name, data)
    data = buffer.getvalue()
    if not end_marker:
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            last = archive.getmembers()[-1]
        data = data[: last.offset_data + (last.size + 511) // 512 * 512]
    return data


def _member_offsets(data: bytes) -> Dict[str, Tuple[int, int]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {m.name: (m.offset, m.offset_data) for m in archive.getmembers()}


def write_shards(root: str, compress: bool) -> Tuple[List[str], List[str], List[Tuple[str, str, str]]]:
    """Webdataset shards (``.tar`` or ``.tar.gz``) with every shard-level failure: (paths, kept keys, rejects as
    (shard name, key, reason)). A shard's tail report carries the last good key (which is itself kept)."""
    good = lambda seed: [(f"s{seed}.png", _png(seed)), (f"s{seed}.json", caption_json(f"sample {seed}"))]  # noqa: E731
    suffix = ".tar.gz" if compress else ".tar"
    shards: Dict[str, bytes] = {}
    # 1: duplicates (in a row; and 's0' again later, whose first sample stays), an oversized member, a long
    #    caption without spaces, an escaping member, a non-UTF-8 and a wrongly typed caption, a null caption (absent:
    #    the .txt is used, or without one missing_caption)
    shards["dups"] = _tar_bytes(
        good(0)
        + [("a.png", _png(1)), ("a.json", caption_json("first")), ("a.jpg", _png(2)), ("a.json", caption_json("2nd"))]
        + good(3)
        + [("big.png", _big_png()), ("big.json", caption_json("big"))]
        + [("long.png", _png(4)), ("long.txt", LONG_CAPTION[: MAX_IMAGE_BYTES - 1000].encode())]
        + [("../up.png", _png(5)), ("../up.json", caption_json("up"))]
        + [("s0.png", _png(6)), ("s0.json", caption_json("again"))]
        + [("latin.png", _png(7)), ("latin.json", b'{"caption": "caf' + BAD_UTF8 + b'"}')]
        + [("typed.png", _png(8)), ("typed.json", b'{"caption": ["a", "b"]}')]
        + [("nulltxt.png", _png(20)), ("nulltxt.json", b'{"caption": null}'), ("nulltxt.txt", b"from the txt")]
        + [("null.png", _png(21)), ("null.json", b'{"caption": null, "url": "x"}')]
    )
    # 2: no end-of-archive marker (cut exactly at a member boundary)
    shards["nomarker"] = _tar_bytes(good(10) + good(11), end_marker=False)
    # 3: cut inside a header block after two good samples
    full = _tar_bytes(good(12) + good(13) + good(14))
    header, _ = _member_offsets(full)["s14.png"]
    shards["cuthead"] = full[: header + 100]
    # 4: cut inside a member's data
    full = _tar_bytes(good(15) + good(16))
    _, data_at = _member_offsets(full)["s16.png"]
    shards["cutdata"] = full[: data_at + 10]
    kept = ["s0", "s3", "long", "nulltxt", "s10", "s11", "s12", "s13", "s15"]
    rejected = [("dups", "a", "duplicate_key"), ("dups", "a", "duplicate_key"), ("dups", "big", "image_too_large"),
                ("dups", "../up", "unsafe_member_path"), ("dups", "s0", "duplicate_key"), ("dups", "latin", "bad_record"),
                ("dups", "typed", "bad_record"), ("dups", "null", "missing_caption"), ("nomarker", "s11", "truncated_shard"),
                ("cuthead", "s13", "truncated_shard"), ("cutdata", "s16", "truncated_shard")]
    paths = []
    for name, data in shards.items():
        path = os.path.join(root, name + suffix)
        if compress:
            data = gzip.compress(data, mtime=0)
            if name != "dups":  # the compressed stream itself is cut too: a read error after the good samples
                data = data if name == "nomarker" else data[: len(data) - 8]  # drop the gzip trailer
        with open(path, "wb") as handle:
            handle.write(data)
        paths.append(path)
    return paths, kept, rejected
