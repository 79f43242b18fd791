"""Sample pieces, ids and labels of docs/architecture.md#labels, checked against hand-built sequences."""
import numpy as np
import pytest
import torch

from libra_megatron.data.samples import (
    VICUNA_V1_SYSTEM,
    PieceKind,
    SampleError,
    assemble,
    clean_caption,
    instruct_pieces,
    pretrain_pieces,
    shifted_labels,
)
from libra_megatron.vocab import IGNORE_INDEX


def test_clean_caption_matches_reference_processor():
    assert clean_caption("A Dog ** on the  grass #1") == "a dog on the grass 1"
    assert clean_caption("~x~  ") == "x"
    assert clean_caption("one\ttwo") == "one\ttwo"  # a single tab is not a run of 2+ whitespace
    assert clean_caption(" ".join(str(i) for i in range(100)), 64) == " ".join(str(i) for i in range(64))


def test_text_chunks_tokenise_like_the_whole_string(text_tokenizer):
    tok = text_tokenizer
    whole = tok.encode("USER: what is the color of the bus? ASSISTANT: a red bus 42 ")
    chunked = tok.encode("USER: what is the color of the bus? ASSISTANT:") + tok.encode_continuation(" a red bus 42 ")
    assert whole == chunked
    # a continuation has no dummy prefix: '\n' + text after an image starts with the newline byte
    assert tok.encode_continuation("\nhello")[0] == tok.newline_id
    assert tok.encode("hello")[0] != tok.encode_continuation("hello")[0]


def _codes(seed, vocab):
    return np.random.default_rng(seed).integers(0, vocab.codebook_size, size=(2, vocab.patches_per_image))


def _stored(pieces, codes, vocab):
    """What the reader returns for a sample written from ``pieces``."""
    out = []
    for p in pieces:
        if p.kind in (PieceKind.IMAGE, PieceKind.IMAGE_TARGET):
            out.append((int(p.kind), codes[p.image].reshape(-1)))
            out.append((int(PieceKind.PIXELS), np.zeros(3)))
        else:
            out.append((int(p.kind), np.asarray(p.ids)))
    return out


def test_pretrain_sample_ids_and_labels_by_hand(text_tokenizer):
    tok = text_tokenizer
    vocab = tok.libra_vocab()
    T = vocab.text_vocab_size
    pieces = pretrain_pieces(tok, "A Dog ** on the  grass #1")
    caption = tok._sp.encode("\na dog on the grass 1")  # sentencepiece on '\n'+caption: '▁', <0x0A>, caption...
    assert caption[0] == tok._sp.piece_to_id("▁") and caption[1] == 13
    caption = caption[2:]
    codes = _codes(0, vocab)
    sample = assemble(_stored(pieces, [codes], vocab), vocab, 700)

    expected = np.concatenate([[1], [T + 512], T + codes[0], [T + 513], [13], caption])
    expected1 = np.concatenate([[1], [T + 512], T + codes[1], [T + 513], [13], caption])
    assert sample.tokens[0].tolist() == expected.tolist() and sample.tokens[1].tolist() == expected1.tolist()
    assert sample.vision_indices.tolist() == [578] + list(range(578)) + [578] * (1 + len(caption))
    labels = shifted_labels(sample.tokens, sample.targets)
    # position t predicts t+1: <s>-><boi> (no), <boi>->code1 .. code576-><eoi> (yes), <eoi>->\n (no), \n->caption
    L = sample.length
    want = torch.full((2, L), IGNORE_INDEX)
    want[:, 1:578] = sample.tokens[:, 2:579]  # codes 2..576 and <eoi>
    want[:, 579 : L - 1] = sample.tokens[:, 580:L]
    assert torch.equal(labels, want)
    assert labels[0, 577].item() == vocab.eoi_id and labels[0, 578].item() == IGNORE_INDEX
    assert labels[0, 579].item() == caption[0] and labels[0, -1].item() == IGNORE_INDEX


def test_pretrain_rejects_missing_and_empty_captions(text_tokenizer):
    with pytest.raises(SampleError, match="missing_caption"):
        pretrain_pieces(text_tokenizer, None)
    with pytest.raises(SampleError, match="empty_caption"):
        pretrain_pieces(text_tokenizer, " ** ~ ")


def test_instruct_sample_vicuna_v1_by_hand(text_tokenizer):
    tok = text_tokenizer
    vocab = tok.libra_vocab()
    conversation = [
        {"from": "human", "value": "What is this?\n<image>"},
        {"from": "gpt", "value": "A red bus."},
        {"from": "human", "value": "How many?"},
        {"from": "gpt", "value": "Two."},
    ]
    pieces = instruct_pieces(tok, conversation, has_image=True)
    codes = _codes(1, vocab)
    sample = assemble(_stored(pieces, [codes], vocab), vocab, 2048)
    ids = sample.tokens[0].tolist()
    boi = ids.index(vocab.boi_id)
    sp = tok._sp
    # segments split at <s>, the image and </s>; text after the image has no dummy prefix
    head = sp.encode(VICUNA_V1_SYSTEM + " USER:")
    after_image = sp.encode("\nWhat is this? ASSISTANT: A red bus. ")[1:]  # drop the dummy-prefix '▁'
    round2 = sp.encode("USER: How many? ASSISTANT: Two. ")
    expected_text = [1] + head + ids[boi : boi + 578] + after_image + [2] + round2 + [2]
    assert ids == expected_text
    assert ids[boi : boi + 578] == [vocab.boi_id] + (vocab.text_vocab_size + codes[0]).tolist() + [vocab.eoi_id]
    # targets: each answer (from the token holding its first character) with its lone '▁' and </s>
    targets = sample.targets.tolist()
    assert not any(targets[boi : boi + 578])  # no loss on the image in instruction tuning
    runs, start = [], None  # (first, last) positions of each maximal run of targets
    for t, m in enumerate(targets + [False]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            runs.append((start, t - 1))
            start = None
    assert len(runs) == 2
    answers = [ids[a : b + 1] for a, b in runs]
    assert [answer[-1] for answer in answers] == [2, 2]  # each answer ends with </s>
    assert sp.decode(answers[0][:-1]).strip() == "A red bus." and sp.decode(answers[1][:-1]).strip() == "Two."
    assert sp.id_to_piece(answers[0][-2]) == "▁"  # the lone '▁' before </s> (docs/architecture.md#labels)
    for a, _ in runs:  # "ASSISTANT:" is prompt, not target
        assert sp.decode(ids[a - 12 : a]).endswith("ASSISTANT:")


def test_instruct_text_only_and_errors(text_tokenizer):
    tok = text_tokenizer
    pieces = instruct_pieces(tok, [{"from": "human", "value": "hi <image>"}, {"from": "gpt", "value": "hello"}], False)
    assert all(p.kind in (PieceKind.TEXT, PieceKind.TEXT_TARGET) for p in pieces)
    assert pieces[0].ids == (1,) + tuple(tok.encode(VICUNA_V1_SYSTEM + " USER: hi  ASSISTANT:"))
    with pytest.raises(SampleError, match="bad_conversation"):
        instruct_pieces(tok, [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], False)
    with pytest.raises(SampleError, match="image_tag_mismatch"):
        instruct_pieces(tok, [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], True)
    with pytest.raises(SampleError, match="bad_conversation"):
        instruct_pieces(tok, "not a list", False)


def test_truncation_never_splits_an_image(text_tokenizer):
    vocab = text_tokenizer.libra_vocab()
    codes = [_codes(2, vocab), _codes(3, vocab)]
    stored = [(0, np.array([1, 5, 6])), (3, codes[0].reshape(-1)), (4, np.zeros(2)), (1, np.arange(10, 30)),
              (3, codes[1].reshape(-1)), (4, np.zeros(2)), (1, np.array([7, 8]))]
    full = assemble(stored, vocab, 10_000)
    assert full.length == 3 + 578 + 20 + 578 + 2 and full.images == [0, 1]
    cut = assemble(stored, vocab, 3 + 578 + 20 + 300)  # the second image does not fit: dropped with what follows
    assert cut.length == 3 + 578 + 20 and cut.images == [0]
    cut = assemble(stored, vocab, 3 + 578 + 5)  # text is cut at the limit
    assert cut.length == 586 and cut.images == [0]
    cut = assemble(stored, vocab, 100)  # the first image does not fit
    assert cut.length == 3 and cut.images == []
