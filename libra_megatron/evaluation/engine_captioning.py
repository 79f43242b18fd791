"""Zero-shot captioning inside the trainer (``--eval-captioning FILE``): greedy captions of K held-out images by the
engine's own model at any TP/PP(/VPP), scored with pycocoevalcap's CIDEr and BLEU-4.

* **Inputs, once** (at start-up): the first K images of FILE (any caption format of
  :mod:`libra_megatron.evaluation.tasks`) are split over the data-parallel ranks (rank ``r`` takes every
  ``dp``-th); first-stage ranks turn them into ``to_model_pixels`` uint8, LFQ image spans (the
  ``--image-tokenizer``, exactly what preprocessing stores) and CLIP features (the trainer's own frozen tower);
  every rank knows the fixed layout ``<s> | <boi> codes <eoi> | \\n prompt`` (the raw Libra-Base prompt, ids
  built as :func:`libra_megatron.inference.prompt_text_ids`).
* **Decoding**: a greedy step is one forward-only pass of megatron-core's pipeline schedule over the
  new positions (micro-batches of ``--micro-batch-size`` rows; p2p between stages is the schedule's, so any
  PP/VPP works; under sequence parallelism the rows are right-padded to a multiple of TP, which causal attention
  makes invisible). The last stage takes ``argmax`` of the text logits at the last position (ties: lowest id,
  as the HF export's ``generate``) and broadcasts the tokens over the pipeline group; rows stop at ``</s>``.
  With the KV cache (default; :mod:`libra_megatron.model.kv_cache`) the first step prefills the prompt once and
  every later step feeds only the previous token at its position (one position's hidden state between stages;
  under SP padded to TP positions after the real one, never cached); ``generate(model, kv_cache=False)`` reruns
  the whole sequence every step (the reference the cached path is tested against). See docs/design.md.
* **Training unperturbed**: model chunks in eval mode and back, ``no_grad``, every RNG state restored
  (:func:`libra_megatron.training.evaluation.preserved_rng_state`), the training data stream and counters
  untouched, forward pre-hooks off with a synchronous param gather under ``--overlap-param-gather``.
* **Scores**: captions are gathered over DP; ``captioning_cider`` / ``captioning_bleu4`` (pycocoevalcap scorers,
  Java-free tokenisation: see :mod:`libra_megatron.evaluation.scoring`) go to TensorBoard and the metrics file.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional

import torch


def add_captioning_args(parser: argparse.ArgumentParser) -> None:
    """The ``--eval-captioning*`` flags (a group of the trainer's parser)."""
    group = parser.add_argument_group("zero-shot captioning during training")
    group.add_argument("--eval-captioning", default=None, metavar="FILE",
                       help="held-out captions (COCO-Karpathy JSON, COCO annotations, or JSON lines image/caption)")
    group.add_argument("--eval-captioning-interval", type=int, default=None,
                       help="caption every N iterations (and after the last)")
    group.add_argument("--eval-captioning-samples", type=int, default=16, help="K images (the first K of FILE)")
    group.add_argument("--eval-captioning-max-new-tokens", type=int, default=20)
    group.add_argument("--eval-captioning-tokenizer", default=None,
                       help="sentencepiece model of the data (decodes the captions, builds the prompt)")
    group.add_argument("--eval-captioning-image-root", default=None, help="default: the folder of FILE")
    group.add_argument("--eval-captioning-split", default="test", help="Karpathy split")
    group.add_argument("--eval-captioning-prompt", default="", help="text after the image (default: none)")


def validate_captioning_args(args: argparse.Namespace) -> Optional[str]:
    """An error message for a wrong ``--eval-captioning`` setup, else ``None`` (runs before any process group)."""
    if not getattr(args, "eval_captioning", None):
        return None
    if args.model_family != "libra":
        return "--eval-captioning needs --model-family libra"
    if not os.path.isfile(args.eval_captioning):
        return f"--eval-captioning: file not found: {args.eval_captioning}"
    if not args.eval_captioning_tokenizer or not os.path.isfile(args.eval_captioning_tokenizer):
        return "--eval-captioning needs --eval-captioning-tokenizer (the data's sentencepiece model)"
    if not args.image_tokenizer:
        return "--eval-captioning needs --image-tokenizer (the tokenizer of the training data)"
    if args.eval_captioning_samples < 1 or args.eval_captioning_max_new_tokens < 1:
        return "--eval-captioning-samples and --eval-captioning-max-new-tokens must be >= 1"
    if args.eval_captioning_interval is not None and args.eval_captioning_interval < 1:
        return "--eval-captioning-interval must be >= 1"
    return None


def captioning_due(args: argparse.Namespace, iteration: int) -> bool:
    """Whether captioning runs after the step that reached ``iteration`` (interval, or the last iteration)."""
    if not getattr(args, "eval_captioning", None):
        return False
    interval = args.eval_captioning_interval
    return bool(interval and iteration % interval == 0) or iteration == args.train_iters


class EngineCaptioner:
    """Greedy captioning with the trainer's model chunks (build on every rank; :meth:`run` is collective)."""

    def __init__(self, args: argparse.Namespace, vocab: Any, vision_encoder: Any) -> None:
        from megatron.core import parallel_state as ps

        from libra_megatron.data.text_tokenizer import TextTokenizer
        from libra_megatron.evaluation.tasks import load_caption_items
        from libra_megatron.inference import prompt_text_ids
        from libra_megatron.training.evaluation import preserved_rng_state

        self.args, self.vocab = args, vocab
        items = load_caption_items(args.eval_captioning, args.eval_captioning_image_root, args.eval_captioning_split)
        if not items:  # nothing to score: fail now, not with a missing CIDEr after the first training interval
            raise ValueError(f"--eval-captioning {args.eval_captioning}: no caption items in split "
                             f"{args.eval_captioning_split!r} (see --eval-captioning-split)")
        items = items[: args.eval_captioning_samples]
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.items_all = items
        self.items = items[dp_rank::dp_size]
        self.tokenizer = TextTokenizer(args.eval_captioning_tokenizer)
        if self.tokenizer.vocab_size != vocab.text_vocab_size:
            raise ValueError(f"--eval-captioning-tokenizer {args.eval_captioning_tokenizer}: "
                             f"{self.tokenizer.vocab_size} text ids, the model has {vocab.text_vocab_size}")
        self.before, self.after = prompt_text_ids(self.tokenizer, args.eval_captioning_prompt, chat=False)
        self.device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
        self.spans: Optional[torch.Tensor] = None
        self.features: Optional[torch.Tensor] = None
        if ps.is_pipeline_first_stage(ignore_virtual=True) and self.items:
            with torch.no_grad(), preserved_rng_state():
                self.spans, self.features = self._encode_images(vision_encoder)

    def _encode_images(self, vision_encoder: Any):
        from libra_megatron.tokenizer.image_processing import load_image, normalize_pixels, to_model_pixels
        from libra_megatron.training.vision import load_image_tokenizer

        pixels = torch.stack([to_model_pixels(load_image(item.image)) for item in self.items])
        tokenizer = load_image_tokenizer(self.args.image_tokenizer).to(self.device)  # fp32, as preprocessing
        spans, _ = tokenizer.encode_tokens(normalize_pixels(pixels).to(self.device), self.vocab)  # [C, N, 578]
        spans = spans.cpu()
        del tokenizer
        features = vision_encoder(pixels.to(self.device))
        return spans, features

    # -- one greedy decode ----------------------------------------------------------------------------------------
    def _prompt(self) -> Dict[str, torch.Tensor]:
        vocab, n = self.vocab, len(self.items)
        text = lambda ids: torch.tensor(ids, dtype=torch.long).view(1, 1, -1).expand(vocab.num_codebooks, n, -1)  # noqa: E731
        spans = self.spans if self.spans is not None else torch.zeros(
            vocab.num_codebooks, n, vocab.image_positions, dtype=torch.long)
        tokens = torch.cat([text(self.before), spans, text(self.after)], dim=2)
        vis = torch.cat([torch.full((len(self.before),), vocab.text_vision_index), vocab.image_vision_indices(),
                         torch.full((len(self.after),), vocab.text_vision_index)])
        return {"tokens": tokens, "vision_indices": vis.expand(n, -1).clone()}

    def _micro_batches(self, tokens: torch.Tensor, vision_indices: torch.Tensor, length: int, start: int = 0,
                       with_features: bool = True):
        args, vocab = self.args, self.vocab
        tp = args.tensor_model_parallel_size
        padded = length if not args.sequence_parallel else -(-length // tp) * tp
        n, mbs = tokens.shape[1], args.micro_batch_size
        pad = padded - length
        if pad:
            tokens = torch.cat([tokens, tokens.new_full((tokens.shape[0], n, pad), vocab.pad_id)], dim=2)
            vision_indices = torch.cat([vision_indices, vision_indices.new_full((n, pad), vocab.text_vision_index)], 1)
        positions = torch.arange(start, start + padded).expand(n, -1)
        batches = []
        for start in range(0, n, mbs):  # p2p shapes are static: the last micro-batch repeats its last row
            rows = torch.arange(start, start + mbs).clamp(max=n - 1)
            batch = {"tokens": tokens[:, rows], "vision_indices": vision_indices[rows], "position_ids": positions[rows],
                     "last": length - 1}
            if self.features is not None and with_features:
                batch["clip_features"] = self.features[rows]
            batches.append({k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        vpp = args.virtual_pipeline_model_parallel_size
        while vpp and len(batches) % args.pipeline_model_parallel_size:  # interleaving needs whole rounds
            batches.append(dict(batches[-1]))  # its own dict: a KV cache per micro-batch
        return batches, padded

    def _next_tokens(self, model: List[torch.nn.Module], batches: List[Dict], seq_length: int) -> Optional[torch.Tensor]:
        """Plane-0 argmax at the last position, [rows] on the last stage (``None`` elsewhere)."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        text_vocab = self.vocab.text_vocab_size

        def forward_step(iterator, chunk):
            batch = next(iterator)
            out = chunk(batch["tokens"], batch["vision_indices"], batch["position_ids"], labels=None,
                        clip_features=batch.get("clip_features"), kv_cache=batch.get("kv_cache"))

            def keep_last(output, non_loss_data=False):
                return output[0, :, batch["last"], :text_vocab].argmax(dim=-1)

            return out, keep_last

        iterators = [iter(batches) for _ in model]
        data = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators if len(model) > 1 else iterators[0], model=model,
            num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=batches[0]["tokens"].shape[1],
            decoder_seq_length=seq_length, forward_only=True, collect_non_loss_data=True)
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return None
        return torch.cat(list(data))[: len(self.items)]

    def _step_batches(self, tokens: torch.Tensor, vision_indices: torch.Tensor, caches: Optional[List[Any]]):
        """The micro-batches of the next greedy step: the whole sequence (no cache), the prompt (prefill, a fresh
        KV cache per micro-batch) or the last token alone at its position (decode, ``[1 (or TP under SP), rows]``,
        padding after it is invisible to it and never cached)."""
        from libra_megatron.model.kv_cache import LibraKVCache

        length = tokens.shape[2]
        if caches is None:
            return self._micro_batches(tokens, vision_indices, length)
        prefill = not caches
        if prefill:
            batches, padded = self._micro_batches(tokens, vision_indices, length)
            capacity = length + self.args.eval_captioning_max_new_tokens
            caches.extend(LibraKVCache(capacity) for _ in batches)
        else:
            batches, padded = self._micro_batches(tokens[:, :, -1:], vision_indices[:, -1:], 1, start=length - 1,
                                                  with_features=False)
        for batch, cache in zip(batches, caches):
            cache.keep = length if prefill else 1
            batch["kv_cache"] = cache
        return batches, padded

    @torch.no_grad()
    def generate(self, model: List[torch.nn.Module], kv_cache: bool = True) -> List[List[int]]:
        """Greedy new text ids of this DP rank's images (up to and without ``</s>``), the same on every rank of the
        model-parallel group. Collective over the pipeline group; run it under :func:`inference_guard`.
        ``kv_cache=False``: every step reruns the whole sequence (the reference the cached path is tested against)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if not self.items:
            return []
        prompt = self._prompt()
        tokens, vision_indices = prompt["tokens"], prompt["vision_indices"]
        n, eos = len(self.items), self.vocab.eos_id
        finished = torch.zeros(n, dtype=torch.bool)
        new: List[List[int]] = [[] for _ in range(n)]
        group = ps.get_pipeline_model_parallel_group()
        last_rank = ps.get_pipeline_model_parallel_last_rank()
        caches: Optional[List[Any]] = [] if kv_cache else None
        for _ in range(self.args.eval_captioning_max_new_tokens):
            batches, padded = self._step_batches(tokens, vision_indices, caches)
            chosen = self._next_tokens(model, batches, padded)
            step = chosen.to(self.device) if chosen is not None else torch.zeros(n, dtype=torch.long, device=self.device)
            if ps.get_pipeline_model_parallel_world_size() > 1:
                dist.broadcast(step, src=last_rank, group=group)
            step = step.cpu().masked_fill(finished, self.vocab.pad_id)
            for row in range(n):
                if not finished[row] and int(step[row]) != eos:
                    new[row].append(int(step[row]))
            finished |= step == eos
            tokens = torch.cat([tokens, step.view(1, n, 1).expand(tokens.shape[0], -1, -1)], dim=2)
            vision_indices = torch.cat([vision_indices, torch.full((n, 1), self.vocab.text_vision_index)], dim=1)
            if bool(finished.all()):
                break
        return new

    def run(self, model: List[torch.nn.Module]) -> Optional[Dict[str, Any]]:
        """Caption, gather over DP and score. Collective (every rank); scores on last-stage ranks, else ``None``."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from libra_megatron.evaluation.scoring import score_captions
        from libra_megatron.training.evaluation import inference_guard

        with inference_guard(model, self.args.overlap_param_gather):
            ids = self.generate(model)
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return None
        captions = [self.tokenizer.decode(row).split("\n")[0].strip() for row in ids]
        mine = {item.item_id: caption for item, caption in zip(self.items, captions)}
        gathered: List[Dict[str, str]] = [mine]
        dp_group = ps.get_data_parallel_group()
        if dist.get_world_size(dp_group) > 1:
            gathered = [{} for _ in range(dist.get_world_size(dp_group))]
            dist.all_gather_object(gathered, mine, group=dp_group)
        predictions = {k: v for part in gathered for k, v in part.items()}
        references = {item.item_id: item.references for item in self.items_all}
        scores, _ = score_captions(references, predictions, metrics=("cider", "bleu"), tokenizer="simple")
        return {"captioning_cider": scores["CIDEr"], "captioning_bleu4": scores["BLEU-4"],
                "captioning_samples": len(predictions), "captions": [predictions[i.item_id] for i in self.items_all]}


def log_captioning(logger: Any, iteration: int, consumed_samples: int, result: Optional[Dict[str, Any]]) -> None:
    """TensorBoard scalars and a console line (the metrics-file fields go through the step record)."""
    if result is None or not getattr(logger, "active", False):
        return
    if logger.writer is not None:
        for key in ("captioning_cider", "captioning_bleu4"):
            name = key.replace("captioning_", "captioning ").replace("cider", "CIDEr").replace("bleu4", "BLEU-4")
            logger.writer.add_scalar(name, result[key], iteration)
            logger.writer.add_scalar(f"{name} vs samples", result[key], consumed_samples)
        logger.writer.flush()
    print(f" zero-shot captioning at iteration {iteration}: CIDEr {result['captioning_cider']:.4f} | BLEU-4 "
          f"{result['captioning_bleu4']:.4f} ({result['captioning_samples']} images) | e.g. "
          f"{result['captions'][0]!r}", flush=True)


def captioning_fields(result: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The metrics-file fields of one captioning evaluation."""
    if result is None:
        return {}
    return {k: result[k] for k in ("captioning_cider", "captioning_bleu4", "captioning_samples")}
