"""``tools/generate.py`` end to end on a tiny export (real 578-position images, tiny CLIP/LFQ tokenizer, a trained
toy sentencepiece model), and the prompt ids equal the data pipeline's instruction-sample ids."""
from __future__ import annotations

import contextlib
import io
import json
import os
import runpy

import numpy as np
import pytest
import torch
from PIL import Image

from libra_megatron.data.samples import PieceKind, instruct_pieces
from libra_megatron.hf_modeling.modeling_libra import LibraForCausalLM
from libra_megatron.inference import decode_output, prepare_batch, prompt_text_ids, vocab_of
from libra_megatron.tokenizer.image_tokenizer import ImageTokenizer
from tests.hf_modeling.tiny import sentencepiece_export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    out, tokenizer = sentencepiece_export(tmp)
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 30)), ("b.png", (20, 50))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp / name)
    return tmp, out, tokenizer


def test_chat_prompt_ids_equal_the_instruction_sample_prompt(export):
    _, _, tokenizer = export
    pieces = instruct_pieces(tokenizer, [{"from": "human", "value": "<image>\nwhat color is the bus?"},
                                         {"from": "gpt", "value": "red"}], has_image=True)
    kinds = [p.kind for p in pieces]
    assert kinds[:3] == [PieceKind.TEXT, PieceKind.IMAGE, PieceKind.TEXT]
    before, after = prompt_text_ids(tokenizer, "what color is the bus?", chat=True)
    assert list(pieces[0].ids) == before and list(pieces[2].ids) == after


def test_generate_tool_answers_and_captions(export):
    tmp, out, tokenizer = export
    stdout = io.StringIO()
    argv = ["generate.py", "--model", out, "--image", str(tmp / "a.png"), "--image", str(tmp / "b.png"),
            "--raw", "--max-new-tokens", "4", "--device", "cpu"]
    with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit) as done:
        import sys

        saved = sys.argv
        sys.argv = argv
        try:
            runpy.run_path(os.path.join(ROOT, "tools", "generate.py"), run_name="__main__")
        finally:
            sys.argv = saved
    assert done.value.code == 0
    lines = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [line["image"] for line in lines] == [str(tmp / "a.png"), str(tmp / "b.png")]
    assert all(line["new_tokens"] >= 1 and isinstance(line["text"], str) for line in lines)

    # the same answer by hand: left-padded batch of two different prompts
    model = LibraForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    image_tokenizer = ImageTokenizer.from_pretrained(out)
    from libra_megatron.tokenizer.image_processing import load_image, preprocess_image

    pixels = torch.stack([preprocess_image(load_image(tmp / n)) for n in ("a.png", "b.png")])
    codes, features = image_tokenizer.encode(pixels)
    vocab = vocab_of(model.config)
    batch = prepare_batch(tokenizer, vocab, ["", "a photo of"], codes, features, chat=False)
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[1].all()  # row 0 is shorter: left padded
    assert int(batch.input_ids[0, 0, -1]) == vocab.newline_id
    generated = model.generate(batch.input_ids, vision_indices=batch.vision_indices, attention_mask=batch.attention_mask,
                               contiguous_signal=batch.contiguous_signal, max_new_tokens=4, return_dict_in_generate=True)
    length = batch.input_ids.shape[-1]
    answer = decode_output(tokenizer, vocab, generated.sequences[:, 0, length:], generated.vision_indices[0, length:])
    assert answer.text == lines[0]["text"]
