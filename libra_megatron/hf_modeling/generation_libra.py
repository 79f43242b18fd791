"""Two-plane decoding for ``LibraForCausalLM`` (docs/architecture.md#generation, fixing docs/architecture.md#reference-defects (B5)): greedy, sampling and beam search.

Scores are [C, N, V] (one row per id plane, V = V_text + V_vis) and ids [C, N, T]; every processor works on the
last (vocabulary) dimension of each plane:
- repetition penalty: plane ``c`` penalises the ids already present in plane ``c`` (text ids are equal in both planes,
  so text rows get the same penalty in both; image codes are penalised per codebook);
- top-k / top-p: per plane over the vocabulary; the -inf blocks of the other modality stay -inf;
- after ``<eoi>`` the next token is forced to ``\\n`` (a row of -inf with 0 at ``newline_token_id``: no NaN when
  sampling, unlike the reference's +inf);
- a text position draws ONE token (plane 0) and writes it to both planes; an image position draws one code per
  codebook from its own head;
- ``vision_indices`` continue as ``min(last + 1, max_vision_token_length)`` (after ``<boi>`` exactly 577 image
  positions follow, then text).
Beam search scores a text step by its log-probability and an image step by the sum of both codebooks' log-probs
(the joint of the factorised heads); the cache is reordered with ``LibraCache.reorder_cache``.

This file is copied into every export with ``modeling_libra.py``; it imports only ``torch`` and ``transformers``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

_OPTIONS = (
    "max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
    "repetition_penalty", "num_beams", "length_penalty", "early_stopping", "eos_token_id", "pad_token_id", "use_cache",
)


@dataclass
class LibraGenerateOutput(ModelOutput):
    """``sequences`` [C, B, L+T] (or [B, L+T] for 2-D input), per-step processed ``scores`` [C, B, V], ``vision_indices``."""

    sequences: Optional[torch.LongTensor] = None
    scores: Optional[Tuple[torch.FloatTensor, ...]] = None
    vision_indices: Optional[torch.LongTensor] = None


def infer_vision_indices(ids: torch.Tensor, vocab_size: int, vision_vocab_size: int, max_len: int) -> torch.Tensor:
    """``vision_indices`` [B, L] from plane-0 ids: position minus the position of the latest ``<boi>`` on image ids."""
    boi = vocab_size + vision_vocab_size - 2
    pos = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    last_boi = torch.where(ids == boi, pos, torch.full_like(pos, -1)).cummax(dim=-1).values
    is_image = ids >= vocab_size
    index = pos - last_boi
    if bool((is_image & ((last_boi < 0) | (index >= max_len))).any()):
        raise ValueError("cannot infer vision_indices: an image id is not inside a <boi>-started image span; pass vision_indices")
    return torch.where(is_image, index, torch.full_like(index, max_len))


def apply_repetition_penalty(scores: torch.Tensor, ids: torch.Tensor, penalty: float,
                             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """HF/CTRL penalty per plane: scores [C, N, V], ids [C, N, T], mask [N, T] (1 = count this position)."""
    if penalty == 1.0:
        return scores
    present = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
    weight = torch.ones(ids.shape, dtype=torch.int32, device=ids.device) if mask is None else \
        mask.to(torch.int32).unsqueeze(0).expand_as(ids)
    present = present.scatter_reduce(-1, ids, weight, reduce="amax").bool()
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(present, penalised, scores)


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest scores of each plane row (ties kept), -inf elsewhere."""
    if not top_k or top_k <= 0:
        return scores
    k = min(int(top_k), scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, -float("inf"))


def apply_top_p(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filter per plane row on the vocabulary dimension (the reference scattered on dim 1, docs/architecture.md#reference-defects, B5)."""
    if top_p is None or top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -min_tokens_to_keep:] = False
    remove = remove.scatter(-1, order, remove)
    return scores.masked_fill(remove, -float("inf"))


def force_newline(scores: torch.Tensor, rows: torch.Tensor, newline_id: int) -> torch.Tensor:
    """Rows [N] (bool) whose fed token was ``<eoi>``: only ``\\n`` keeps a finite score (0) in every plane."""
    if not bool(rows.any()):
        return scores
    forced = torch.full_like(scores, -float("inf"))
    forced[..., newline_id] = 0.0
    return torch.where(rows[None, :, None], forced, scores)


class _DecodeState:
    """Ids, vision indices, attention mask, CLIP signal and cache of the rows being decoded."""

    def __init__(self, model, ids, vision_indices, mask, signal, use_cache: bool) -> None:
        self.model, self.cfg = model, model.config
        self.ids, self.vi, self.mask, self.signal = ids, vision_indices, mask, signal
        self.prompt_len = ids.shape[-1]
        self.use_cache = use_cache
        self.cache = None
        self.checked = False  # the prompt is validated once by the model; generated ids are ours

    def scores(self) -> torch.Tensor:
        """Run the model on the positions not yet cached; return the last position's logits [C, N, V] in fp32."""
        start = self.cache.get_seq_length() if self.cache is not None else 0
        end = self.ids.shape[-1]
        positions = (self.mask.long().cumsum(-1) - 1).masked_fill(self.mask == 0, 1)
        signal = None
        if self.signal is not None and start < self.prompt_len:
            signal = self.signal[:, start:]
            if end > self.prompt_len:  # generated positions carry no CLIP features (reference: signal None = zeros)
                pad = signal.new_zeros(signal.shape[0], end - self.prompt_len, signal.shape[-1])
                signal = torch.cat([signal, pad], dim=1)
        out = self.model(
            input_ids=self.ids[..., start:], vision_indices=self.vi[:, start:], attention_mask=self.mask,
            position_ids=positions[:, start:], past_key_values=self.cache, use_cache=self.use_cache,
            contiguous_signal=signal, logits_to_keep=1, _ids_checked=self.checked and start >= self.prompt_len,
        )
        self.checked = True
        if self.use_cache:
            self.cache = out.past_key_values
        return out.logits[:, :, -1, :].float()

    def next_vision_indices(self) -> torch.Tensor:
        return (self.vi[:, -1] + 1).clamp(max=self.cfg.max_vision_token_length)

    def eoi_rows(self) -> torch.Tensor:
        return self.vi[:, -1] == self.cfg.max_vision_token_length - 1

    def append(self, tokens: torch.Tensor, next_vi: torch.Tensor) -> None:
        self.ids = torch.cat([self.ids, tokens.unsqueeze(-1)], dim=-1)
        self.vi = torch.cat([self.vi, next_vi.unsqueeze(-1)], dim=-1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)

    def reorder(self, index: torch.Tensor) -> None:
        self.ids, self.vi, self.mask = self.ids[:, index], self.vi[index], self.mask[index]
        if self.signal is not None:
            self.signal = self.signal[index]
        if self.cache is not None:
            self.cache.reorder_cache(index)


def _option(name: str, kwargs: dict, generation_config, default):
    value = kwargs.get(name)
    if value is None and generation_config is not None:
        value = getattr(generation_config, name, None)
    return default if value is None else value


def _eos_list(eos) -> List[int]:
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _processed_scores(state: _DecodeState, raw: torch.Tensor, step: int, opts: dict) -> torch.Tensor:
    """Repetition penalty, minimum length, forced newline (all modes); temperature/top-k/top-p when sampling."""
    cfg = state.cfg
    scores = apply_repetition_penalty(raw, state.ids, opts["repetition_penalty"], state.mask)
    if step < opts["min_new_tokens"] and opts["eos"]:
        scores[..., opts["eos"]] = -float("inf")
    scores = force_newline(scores, state.eoi_rows(), cfg.newline_token_id)
    if opts["do_sample"]:
        if opts["temperature"] != 1.0:
            scores = scores / opts["temperature"]
        scores = apply_top_p(apply_top_k(scores, opts["top_k"]), opts["top_p"])
    return scores


@torch.no_grad()
def _greedy_or_sample(state: _DecodeState, opts: dict, generator) -> List[torch.Tensor]:
    cfg = state.cfg
    n = state.ids.shape[1]
    finished = torch.zeros(n, dtype=torch.bool, device=state.ids.device)
    kept_scores = []
    for step in range(opts["max_new_tokens"]):
        scores = _processed_scores(state, state.scores(), step, opts)
        kept_scores.append(scores)
        if opts["do_sample"]:
            probs = scores.softmax(dim=-1)
            drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:2])
        else:
            drawn = scores.argmax(dim=-1)
        next_vi = state.next_vision_indices()
        is_text = next_vi == cfg.max_vision_token_length
        tokens = torch.where(is_text.unsqueeze(0), drawn[:1].expand_as(drawn), drawn)  # one text token for both planes
        tokens = tokens.masked_fill(finished.unsqueeze(0), opts["pad"])
        next_vi = next_vi.masked_fill(finished, cfg.max_vision_token_length)
        state.append(tokens, next_vi)
        if opts["eos"]:
            finished |= is_text & torch.isin(tokens[0], torch.tensor(opts["eos"], device=tokens.device))
        if bool(finished.all()):
            break
    return kept_scores


def _pad_candidates(scores: torch.Tensor, index: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pad [N, m] candidates to [N, n] with impossible ones (-inf, index 0) when the vocabulary is smaller than n."""
    if scores.shape[-1] >= n:
        return scores, index
    fill = n - scores.shape[-1]
    return (torch.cat([scores, scores.new_full((scores.shape[0], fill), -float("inf"))], dim=-1),
            torch.cat([index, index.new_zeros((index.shape[0], fill))], dim=-1))


@torch.no_grad()
def _beam_search(state: _DecodeState, batch: int, opts: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """Beam search over the joint (text token | codebook pair) at each step; returns (ids [C,B,T], vision idx [B,T])."""
    cfg, k = state.cfg, opts["num_beams"]
    v_text, v_vis = cfg.vocab_size, cfg.vision_vocab_size
    device = state.ids.device
    beam_scores = torch.zeros(batch, k, device=device)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    hyps: List[List[Tuple[float, torch.Tensor, torch.Tensor]]] = [[] for _ in range(batch)]
    done = [False] * batch
    lp, n_cand = opts["length_penalty"], 2 * k

    def add_hyp(b: int, score: float, ids: torch.Tensor, vi: torch.Tensor) -> None:
        gen_len = ids.shape[-1] - state.prompt_len
        hyps[b].append((score / (max(gen_len, 1) ** lp), ids, vi))
        hyps[b].sort(key=lambda h: -h[0])
        del hyps[b][k:]

    for step in range(opts["max_new_tokens"]):
        logp = F.log_softmax(_processed_scores(state, state.scores(), step, opts), dim=-1)  # [C, B*k, V]
        next_vi = state.next_vision_indices()
        is_text = next_vi == cfg.max_vision_token_length
        text_lp, text_tok = _pad_candidates(*logp[0, :, :v_text].topk(min(n_cand, v_text), dim=-1), n_cand)
        nv = min(n_cand, v_vis)
        lp0, tok0 = logp[0, :, v_text:].topk(nv, dim=-1)
        lp1, tok1 = logp[-1, :, v_text:].topk(nv, dim=-1)
        pair_lp, pair_idx = _pad_candidates(*(lp0[:, :, None] + lp1[:, None, :]).flatten(1).topk(min(n_cand, nv * nv), dim=-1), n_cand)
        pair = torch.stack([tok0.gather(1, pair_idx // nv), tok1.gather(1, pair_idx % nv)]) + v_text  # [2, B*k, 2k]
        cand_lp = torch.where(is_text[:, None], text_lp, pair_lp)
        cand_tok = torch.where(is_text[None, :, None], text_tok.unsqueeze(0).expand(2, -1, -1), pair)
        if cfg.vision_codebook_num != 2:
            raise NotImplementedError("beam search is implemented for two codebooks")
        total = (beam_scores[:, None] + cand_lp).view(batch, k * n_cand)
        top_scores, top_idx = total.topk(n_cand, dim=-1)
        select, tokens, scores = [], [], []
        for b in range(batch):
            chosen = []
            if done[b]:
                chosen = [(b * k, torch.full((2,), opts["pad"], device=device), 0.0)] * k
            else:
                for rank in range(n_cand):
                    row = b * k + int(top_idx[b, rank]) // n_cand
                    tok = cand_tok[:, row, int(top_idx[b, rank]) % n_cand]
                    score = float(top_scores[b, rank])
                    if bool(is_text[row]) and int(tok[0]) in opts["eos"]:
                        if rank < k:
                            ids = torch.cat([state.ids[:, row], tok[:, None]], dim=-1)
                            vi = torch.cat([state.vi[row], next_vi[row:row + 1]])
                            add_hyp(b, score, ids, vi)
                    else:
                        chosen.append((row, tok, score))
                    if len(chosen) == k:
                        break
                if not chosen:  # every candidate ended the sequence: keep a dead beam
                    chosen = [(b * k, torch.full((2,), opts["pad"], device=device), -float("inf"))] * k
                best_running = chosen[0][2] / (max(state.ids.shape[-1] + 1 - state.prompt_len, 1) ** lp)
                if len(hyps[b]) >= k and (opts["early_stopping"] or hyps[b][-1][0] >= best_running):
                    done[b] = True
            for row, tok, score in chosen:
                select.append(row)
                tokens.append(tok)
                scores.append(score)
        index = torch.tensor(select, device=device)
        next_tokens = torch.stack(tokens, dim=1)
        beam_scores = torch.tensor(scores, device=device)
        next_vi = next_vi[index]
        state.reorder(index)
        state.append(next_tokens, next_vi)
        if all(done):
            break
    for b in range(batch):
        if not done[b]:
            for j in range(k):
                row = b * k + j
                add_hyp(b, float(beam_scores[row]), state.ids[:, row], state.vi[row])
    best = [hyps[b][0] for b in range(batch)]
    length = max(h[1].shape[-1] for h in best)
    out_ids = torch.full((2, batch, length), opts["pad"], dtype=torch.long, device=device)
    out_vi = torch.full((batch, length), cfg.max_vision_token_length, dtype=torch.long, device=device)
    for b, (_, ids, vi) in enumerate(best):
        out_ids[:, b, : ids.shape[-1]] = ids
        out_vi[b, : vi.shape[-1]] = vi
    return out_ids, out_vi


def libra_generate(model, input_ids: torch.Tensor, generation_config=None, attention_mask=None, vision_indices=None,
                   contiguous_signal=None, output_scores: bool = False, return_dict_in_generate: bool = False,
                   generator: Optional[torch.Generator] = None, **kwargs):
    """Decode from ``input_ids`` [C, B, L] (or text-only [B, L]); options as HF ``generate`` (``max_new_tokens``,
    ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``num_beams``, ``length_penalty``,
    ``early_stopping``, ``min_new_tokens``, ``eos_token_id``, ``pad_token_id``, ``use_cache``), read from
    ``generation_config`` / ``model.generation_config`` when not given. Left padding via ``attention_mask``."""
    cfg = model.config
    if contiguous_signal is None:
        contiguous_signal = kwargs.pop("coninous_signal", None)
    unknown = sorted(set(kwargs) - set(_OPTIONS) - {"num_return_sequences"})
    if unknown:
        raise TypeError(f"LibraForCausalLM.generate got unsupported arguments: {unknown}")
    if kwargs.get("num_return_sequences") not in (None, 1):
        raise NotImplementedError("num_return_sequences > 1 is not supported")
    gen = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    two_d = input_ids.dim() == 2
    ids = input_ids.unsqueeze(0).expand(cfg.vision_codebook_num, -1, -1) if two_d else input_ids
    ids = ids.to(model.device if hasattr(model, "device") else ids.device).long()
    batch, prompt_len = ids.shape[1:]
    if vision_indices is None:
        vision_indices = infer_vision_indices(ids[0], cfg.vocab_size, cfg.vision_vocab_size, cfg.max_vision_token_length)
    mask = torch.ones(batch, prompt_len, dtype=torch.long, device=ids.device) if attention_mask is None else attention_mask
    max_new = kwargs.get("max_new_tokens")
    if max_new is None:
        max_length = kwargs.get("max_length")
        if max_length is None:
            max_new = getattr(gen, "max_new_tokens", None)
            max_length = getattr(gen, "max_length", None) if max_new is None else None
        if max_new is None:
            max_new = (max_length if max_length is not None else 20) - prompt_len
    if max_new <= 0:
        raise ValueError(f"nothing to generate: the prompt has {prompt_len} positions; pass max_new_tokens")
    eos = kwargs.get("eos_token_id")
    opts = {
        "max_new_tokens": int(max_new),
        "min_new_tokens": int(_option("min_new_tokens", kwargs, gen, 0)),
        "do_sample": bool(_option("do_sample", kwargs, gen, False)),
        "temperature": float(_option("temperature", kwargs, gen, 1.0)),
        "top_k": int(_option("top_k", kwargs, gen, 50)),  # HF default
        "top_p": float(_option("top_p", kwargs, gen, 1.0)),
        "repetition_penalty": float(_option("repetition_penalty", kwargs, gen, 1.0)),
        "num_beams": int(_option("num_beams", kwargs, gen, 1)),
        "length_penalty": float(_option("length_penalty", kwargs, gen, 1.0)),
        "early_stopping": _option("early_stopping", kwargs, gen, False) is True,
        "eos": _eos_list(eos if eos is not None else (getattr(gen, "eos_token_id", None) or cfg.eos_token_id)),
        "pad": int(_option("pad_token_id", kwargs, gen, cfg.pad_token_id)),
    }
    if opts["do_sample"] and opts["temperature"] <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {opts['temperature']}")
    use_cache = bool(_option("use_cache", kwargs, None, True))
    if contiguous_signal is not None:
        contiguous_signal = contiguous_signal.to(ids.device)
    state = _DecodeState(model, ids.clone(), vision_indices.to(ids.device).long(), mask.to(ids.device).long(),
                         contiguous_signal, use_cache)
    scores: Sequence[torch.Tensor] = ()
    if opts["num_beams"] > 1:
        if opts["do_sample"]:
            raise NotImplementedError("beam sampling (num_beams > 1 with do_sample=True) is not supported")
        expand = torch.arange(batch, device=ids.device).repeat_interleave(opts["num_beams"])
        state.reorder(expand)
        sequences, out_vi = _beam_search(state, batch, opts)
    else:
        scores = _greedy_or_sample(state, opts, generator)
        sequences, out_vi = state.ids, state.vi
    if two_d:
        sequences = sequences[0]
    if return_dict_in_generate:
        return LibraGenerateOutput(sequences=sequences, scores=tuple(scores) if output_scores else None, vision_indices=out_vi)
    return sequences
