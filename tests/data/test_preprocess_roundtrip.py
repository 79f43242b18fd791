"""Round trip: a generated corpus (several image sizes and modes, every input layout) -> preprocessing ->
the training dataset, compared with ids, pixels and labels built by hand from docs/architecture.md#labels."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from libra_megatron.data.dataset import LibraDataset, LibraDatasetConfig, collate_batch
from libra_megatron.data.indexed import SampleReader
from libra_megatron.data.preprocess_job import PreprocessConfig, run_preprocessing
from libra_megatron.data.samples import VICUNA_V1_SYSTEM
from libra_megatron.data.sidecar import read_sidecar
from libra_megatron.tokenizer.image_processing import normalize_pixels, to_model_pixels
from libra_megatron.vocab import IGNORE_INDEX
from tests.data.corpus import CAPTIONS, IMAGE_SPECS, caption_json, write_images, write_shard


def _config(tmp, sp_model_path, input_format, inputs, **kwargs):
    defaults = dict(input_format=input_format, inputs=inputs, output_prefix=str(tmp / "out" / input_format),
                    tokenizer_model=str(sp_model_path), tiny_image_tokenizer_seed=0, workers=0, batch_size=3,
                    chunk_size=3, progress=False, device="cpu")
    defaults.update(kwargs)
    return PreprocessConfig(**defaults)


def _expected_codes(image_tokenizer, files, names):
    pixels = torch.stack([to_model_pixels(Image.open(io.BytesIO(files[n]))) for n in names])
    codes, _ = image_tokenizer.encode(normalize_pixels(pixels))
    return pixels, codes


def _caption_ids(tok, cleaned):
    ids = tok._sp.encode("\n" + cleaned)  # '▁', <0x0A>, caption as it follows the newline
    assert ids[:2] == [tok._sp.piece_to_id("▁"), 13]
    return ids[2:]


def _check_pretrain_rows(ds, tok, names, pixels, codes, seq_length):
    vocab = ds.vocab
    T = vocab.text_vocab_size
    reader_docs = [ds.order.locate(i)[1] for i in range(len(ds))]
    assert sorted(d[0] for d in reader_docs) == list(range(len(names)))
    for i in range(len(ds)):
        row = ds[i]
        doc = reader_docs[i][0]
        caption = _caption_ids(tok, CAPTIONS[names[doc]][1])
        for c in range(2):
            ids = [1, vocab.boi_id] + (T + codes[c, doc]).tolist() + [vocab.eoi_id, 13] + caption
            ids = ids[:seq_length]
            n = len(ids)
            assert row["tokens"][c, :n].tolist() == ids, f"sample {names[doc]} plane {c}"
            assert row["tokens"][c, n:].eq(0).all()
            labels = [IGNORE_INDEX] * seq_length
            for t in range(1, 578):  # positions of <boi>, code1..code575 predict code2..code576 and then <eoi>
                labels[t] = ids[t + 1]
            for t in range(579, n - 1):  # '\n' and caption positions predict the next caption token
                labels[t] = ids[t + 1]
            assert row["labels"][c].tolist() == labels, f"labels of {names[doc]} plane {c}"
        assert row["vision_indices"][:580].tolist() == [578] + list(range(578)) + [578]
        assert row["vision_indices"][580:].eq(578).all()
        assert row["position_ids"].tolist() == list(range(n)) + list(range(seq_length - n))
        assert torch.equal(row["pixels"], pixels[doc : doc + 1]), f"pixels of {names[doc]}"
        assert row["sample_id"] == i


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    files = write_images(str(root / "images"))
    return root, files


def test_webdataset_and_image_folder_round_trip(corpus, tmp_path, sp_model_path, text_tokenizer, image_tokenizer):
    root, files = corpus
    names = [spec[0] for spec in IMAGE_SPECS]
    samples = []
    for n, name in enumerate(names):
        ext = name.rsplit(".", 1)[1]
        members = {ext: files[name]}
        if n % 3 == 2:
            members["txt"] = CAPTIONS[name][0].encode()  # LAION shards may carry the caption as .txt
        else:
            members["json"] = caption_json(CAPTIONS[name][0])
        samples.append((f"{n:06d}", members))
    write_shard(str(tmp_path / "shard-0.tar"), samples[:5])
    write_shard(str(tmp_path / "shard-1.tar"), samples[5:])
    summary = run_preprocessing(_config(tmp_path, sp_model_path, "webdataset", [str(tmp_path / "shard-*.tar")],
                                        workers=2))
    assert summary["dataset"]["samples"] == len(names) and summary["rejected"] == 0
    meta = read_sidecar(str(tmp_path / "out" / "webdataset"))
    assert meta["kind"] == "pretrain" and meta["index_dtype"] == "uint16"
    assert meta["text_tokenizer"]["sha256"] == text_tokenizer.sha256 and meta["pixels"]["format"] == "webp"
    assert meta["counts"]["images"] == len(names) and meta["image_tokenizer"]["name"] == "tiny:0"

    pixels, codes = _expected_codes(image_tokenizer, files, names)
    ds = LibraDataset(LibraDatasetConfig([str(tmp_path / "out" / "webdataset")], seq_length=700),
                      vocab=text_tokenizer.libra_vocab())
    _check_pretrain_rows(ds, text_tokenizer, names, pixels, codes, 700)

    # the same corpus as an image folder + captions.jsonl gives the same samples, in the same order
    with open(tmp_path / "captions.jsonl", "w") as handle:
        for name in names:
            handle.write(json.dumps({"image": name, "caption": CAPTIONS[name][0]}) + "\n")
    run_preprocessing(_config(tmp_path, sp_model_path, "image-folder", [str(tmp_path / "captions.jsonl")],
                              image_root=str(root / "images")))
    a, b = SampleReader(str(tmp_path / "out" / "webdataset")), SampleReader(str(tmp_path / "out" / "image-folder"))
    for i in range(len(names)):
        for (mode_a, arr_a), (mode_b, arr_b) in zip(a.pieces(i), b.pieces(i), strict=True):
            assert mode_a == mode_b and np.array_equal(arr_a, arr_b)


def test_coco_karpathy_and_llava_round_trip(corpus, tmp_path, sp_model_path, text_tokenizer, image_tokenizer):
    root, files = corpus
    coco = [{"image": "rgb_wide.jpg", "caption": "A Dog ** on the  grass #1", "image_id": 1},
            {"image": "palette_small.png", "caption": ["Small HOUSE", "a red bus"], "image_id": 2}]
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    summary = run_preprocessing(_config(tmp_path, sp_model_path, "coco-karpathy", [str(tmp_path / "coco.json")],
                                        image_root=str(root / "images")))
    assert summary["dataset"]["samples"] == 3
    reader = SampleReader(str(tmp_path / "out" / "coco-karpathy"))
    ds = LibraDataset(LibraDatasetConfig([str(tmp_path / "out" / "coco-karpathy")], seq_length=700))
    vocab = ds.vocab
    caption_texts = ["a dog on the grass 1", "small house", "a red bus"]
    for doc, cleaned in enumerate(caption_texts):
        pieces = reader.pieces(doc)
        assert [m for m, _ in pieces] == [0, 3, 4, 0, 1]
        assert pieces[4][1].tolist() == _caption_ids(text_tokenizer, cleaned)

    llava = [
        {"id": "a", "image": "gray_tall.png", "conversations": [
            {"from": "human", "value": "What animal is this?\n<image>"}, {"from": "gpt", "value": "Two cats."},
            {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "On a table."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
        {"id": "c", "image": "rgba_square.png", "conversations": [
            {"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "Red."}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    run_preprocessing(_config(tmp_path, sp_model_path, "llava", [str(tmp_path / "llava.json")],
                              image_root=str(root / "images"), chunk_size=2))
    prefix = str(tmp_path / "out" / "llava")
    assert read_sidecar(prefix)["kind"] == "instruct"
    ds = LibraDataset(LibraDatasetConfig([prefix], seq_length=2048))
    pixels, codes = _expected_codes(image_tokenizer, files, ["gray_tall.png", "rgba_square.png"])
    sp = text_tokenizer._sp
    T = vocab.text_vocab_size
    image_span = {0: [vocab.boi_id] + (T + codes[0, 0]).tolist() + [vocab.eoi_id],
                  2: [vocab.boi_id] + (T + codes[0, 1]).tolist() + [vocab.eoi_id]}
    system = sp.encode(VICUNA_V1_SYSTEM + " USER:")
    expected = {
        0: ([1] + system, image_span[0], sp.encode("\nWhat animal is this? ASSISTANT:")[1:], sp.encode(" Two cats. ")[1:] + [2],
            sp.encode("USER: Where? ASSISTANT:"), sp.encode(" On a table. ")[1:] + [2]),
        1: ([1] + sp.encode(VICUNA_V1_SYSTEM + " USER: Say hi. ASSISTANT:"), sp.encode(" hi ")[1:] + [2]),
        2: ([1] + system, image_span[2], sp.encode("\nColor? ASSISTANT:")[1:], sp.encode(" Red. ")[1:] + [2]),
    }
    # answers are continuations: sentencepiece's dummy '▁' is not part of ' Two cats. ' (its own '▁' is)
    for i in range(len(ds)):
        row = ds[i]
        doc = ds.order.locate(i)[1][0]
        parts = expected[doc]
        ids = [t for part in parts for t in part]
        target = [t for part in parts for t in [part[-1] == 2] * len(part)]  # answer parts end with </s>
        n = len(ids)
        assert row["tokens"][0, :n].tolist() == ids, f"llava sample {doc}"
        want = [IGNORE_INDEX] * 2048
        for t in range(n - 1):
            if target[t + 1]:
                want[t] = ids[t + 1]
        assert row["labels"][0].tolist() == want
        n_images = 1 if doc in (0, 2) else 0
        assert row["pixels"].shape[0] == n_images
        if n_images:
            assert torch.equal(row["pixels"][0], pixels[0 if doc == 0 else 1])
    batch = collate_batch([ds[i] for i in range(len(ds))])
    assert batch["pixels"].shape[0] == 2 and batch["tokens"].shape == (2, 3, 2048)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tokenisation_matches_cpu(corpus, tmp_path, sp_model_path):
    """Image codes tokenised on CUDA (fp32) agree with the CPU run except where a logit is within rounding of 0."""
    root, _ = corpus
    names = [spec[0] for spec in IMAGE_SPECS]
    with open(tmp_path / "captions.jsonl", "w") as handle:
        for name in names:
            handle.write(json.dumps({"image": name, "caption": CAPTIONS[name][0]}) + "\n")
    readers = {}
    for device in ("cpu", "cuda"):
        config = _config(tmp_path / device, sp_model_path, "image-folder", [str(tmp_path / "captions.jsonl")],
                         image_root=str(root / "images"), device=device, tokenizer_dtype="fp32", batch_size=8)
        run_preprocessing(config)
        readers[device] = SampleReader(config.output_prefix)
    agree = total = 0
    for i in range(len(names)):
        for (mode_a, a), (mode_b, b) in zip(readers["cpu"].pieces(i), readers["cuda"].pieces(i), strict=True):
            assert mode_a == mode_b
            if mode_a in (2, 3):
                agree += int((a == b).sum())
                total += a.size
            else:  # text and pixels are computed on the CPU either way
                assert np.array_equal(a, b)
    assert agree / total > 0.995
