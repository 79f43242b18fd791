"""``tools/evaluate.py``'s engine: load a model, generate answers in batches (data-parallel, resumable), score.

* **Model**: an HF Libra export (``config.json``), or an engine checkpoint (trainer ``--save`` root or ``iter_*``
  folder), which rank 0 converts with ``tools/convert_checkpoint.py engine-to-hf`` into ``<output>/hf_export``
  (fp32 on CPU, bf16 on CUDA) while the other ranks wait. ``hf_export/source.json`` records what it was made from
  (the ``iter_*`` folder, the tracker's contents, dtype, tokenizers); a later run reuses the export only when that
  matches, else converts again into a temporary folder renamed over the old one.
* **Resume guard**: ``<output>/run.json`` records the settings that determine the predictions (task, data, model,
  prompt, template, max new tokens, sampling, dtype, ...) at the first start; a rerun into the same ``--output``
  with other settings is refused naming the fields (predictions of two setups would mix).
* **Prompts**: :mod:`libra_megatron.inference` builds the ids (``raw``: ``<s> image \\n prompt``, the base model's
  captioning; ``chat``: vicuna_v1); ``--template auto`` uses raw for ``caption`` and chat for ``vqa``/``choice``.
* **Generation**: the export's own ``generate`` (KV cache), greedy by default; with ``do_sample`` every batch draws
  from a generator seeded by ``(seed, first item id)``, so a rerun with the same batch size and world size
  reproduces the answers. Captions are cut at the first newline.
* **Data parallelism**: under ``torchrun`` each rank takes every ``world``-th unfinished item; predictions go to
  per-rank files (:mod:`.predictions`), rank 0 merges and scores after a barrier.
* **Bad items**: a missing or undecodable image is recorded as ``skipped`` (with the reason) and counted, never
  retried, never fatal.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from libra_megatron.data.sidecar import atomic_write_json
from libra_megatron.evaluation.predictions import PredictionWriter, read_finished, write_merged
from libra_megatron.evaluation.report import build_summary, markdown_table, write_summary
from libra_megatron.evaluation.tasks import EvalItem, load_items
from libra_megatron.training.checkpointing import TRACKER_FILENAME as TRACKER
from libra_megatron.training.checkpointing import checkpoint_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAPTION_CHAT_PROMPT = "Provide a one-sentence caption for the provided image."
EXPORT_SOURCE = "source.json"
RUN_FILE = "run.json"


@dataclass
class EvalOptions:
    """Everything one evaluation run needs (the CLI flags of ``tools/evaluate.py``)."""

    task: str
    data: str
    model: str
    output: str
    annotations: Optional[str] = None
    image_root: Optional[str] = None
    image_pattern: Optional[str] = None
    split: str = "test"
    tokenizer: Optional[str] = None
    vision_tokenizer: Optional[str] = None
    template: str = "auto"
    prompt: Optional[str] = None
    batch_size: int = 8
    max_new_tokens: Optional[int] = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    device: Optional[str] = None
    dtype: Optional[str] = None
    limit: Optional[int] = None
    caption_metrics: Sequence[str] = ("cider", "bleu", "meteor", "spice")
    caption_tokenizer: Optional[str] = None
    progress: bool = True


def is_engine_checkpoint(path: str) -> bool:
    """A trainer ``--save`` root (``latest_checkpointed_iteration.txt``) or an ``iter_*`` folder."""
    return (os.path.isfile(os.path.join(path, TRACKER))
            or (os.path.basename(os.path.normpath(path)).startswith("iter_") and os.path.isdir(path)))


def _dist() -> Tuple[int, int]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _read_json(path: str) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _abs(path: Optional[str]) -> Optional[str]:
    return os.path.realpath(path) if path else None


def export_source(options: EvalOptions, dtype_name: str) -> Dict[str, Any]:
    """What ``<output>/hf_export`` is converted from: the ``iter_*`` folder the tracker names (or the folder
    itself), the tracker's contents, the size and mtime of its ``metadata.json``, the dtype and the tokenizers."""
    folder, tracker = os.path.realpath(options.model), None
    if os.path.isfile(os.path.join(folder, TRACKER)):
        with open(os.path.join(folder, TRACKER), encoding="utf-8") as handle:
            tracker = handle.read().strip()
        if tracker.isdigit():
            folder = checkpoint_dir(folder, int(tracker))
    metadata = os.path.join(folder, "metadata.json")
    info = os.stat(metadata) if os.path.isfile(metadata) else None
    stamp = [info.st_size, info.st_mtime_ns] if info is not None else None
    return {"checkpoint": folder, "tracker": tracker, "metadata_json": stamp, "dtype": dtype_name,
            "tokenizer": _abs(options.tokenizer), "vision_tokenizer": _abs(options.vision_tokenizer)}


def _convert(options: EvalOptions, dtype_name: str, target: str, source: Dict[str, Any]) -> None:
    """Convert into a temporary folder, record ``source.json`` there, then rename it over ``target``."""
    parent = os.path.dirname(target)
    for stale in glob.glob(os.path.join(parent, ".hf_export.*")):  # leftovers of a killed conversion
        shutil.rmtree(stale, ignore_errors=True)
    tmp, old = os.path.join(parent, f".hf_export.tmp-{os.getpid()}"), os.path.join(parent, f".hf_export.old-{os.getpid()}")
    command = [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "engine-to-hf",
               "--source", options.model, "--output", tmp, "--dtype", dtype_name, "--overwrite"]
    if options.tokenizer:
        command += ["--tokenizer-dir", os.path.dirname(os.path.abspath(options.tokenizer))]
    if options.vision_tokenizer:
        command += ["--vision-tokenizer-dir", options.vision_tokenizer]
    print(f"evaluate: converting engine checkpoint {source['checkpoint']} -> {target}", flush=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the converter is its own single-process job
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0 or not os.path.isfile(os.path.join(tmp, "config.json")):
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"engine -> HF conversion failed ({done.returncode}):\n{done.stdout[-3000:]}")
    atomic_write_json(os.path.join(tmp, EXPORT_SOURCE), source)
    if os.path.exists(target):
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def resolve_model(options: EvalOptions, rank: int, dtype_name: str) -> str:
    """The HF folder to load: the export itself, or ``<output>/hf_export`` converted from an engine checkpoint
    (reused only when its ``source.json`` matches :func:`export_source`)."""
    if not os.path.isdir(options.model):
        raise FileNotFoundError(f"--model: folder not found: {options.model}")
    if os.path.isfile(os.path.join(options.model, "config.json")):
        return options.model
    if not is_engine_checkpoint(options.model):
        raise ValueError(f"--model {options.model}: neither an HF export (config.json) nor an engine checkpoint "
                         "(latest_checkpointed_iteration.txt or iter_*)")
    target = os.path.join(options.output, "hf_export")
    if rank == 0:
        source = json.loads(json.dumps(export_source(options, dtype_name)))
        if (not os.path.isfile(os.path.join(target, "config.json"))
                or _read_json(os.path.join(target, EXPORT_SOURCE)) != source):
            _convert(options, dtype_name, target, source)
    _barrier()
    return target


def _effective_template(options: EvalOptions) -> str:
    """``raw`` or ``chat`` (``auto``: raw for caption, chat for vqa / choice)."""
    if options.template == "auto":
        return "raw" if options.task == "caption" else "chat"
    return options.template


def _effective_max_new_tokens(options: EvalOptions) -> int:
    return options.max_new_tokens or {"caption": 30, "vqa": 16}.get(options.task, 8)


def run_settings(options: EvalOptions, dtype_name: str) -> Dict[str, Any]:
    """The settings that determine the predictions (``run.json``): a resume must match them. Sampling options
    count only when sampling."""
    settings: Dict[str, Any] = {
        "task": options.task, "data": _abs(options.data), "annotations": _abs(options.annotations),
        "split": options.split if options.task == "caption" else None, "image_root": _abs(options.image_root),
        "image_pattern": options.image_pattern, "model": _abs(options.model), "tokenizer": _abs(options.tokenizer),
        "vision_tokenizer": _abs(options.vision_tokenizer), "template": _effective_template(options),
        "prompt": options.prompt, "max_new_tokens": _effective_max_new_tokens(options), "dtype": dtype_name,
        "do_sample": options.do_sample}
    if is_engine_checkpoint(options.model) and not os.path.isfile(os.path.join(options.model, "config.json")):
        settings["checkpoint"] = {k: v for k, v in export_source(options, dtype_name).items()
                                  if k in ("checkpoint", "tracker", "metadata_json")}
    if options.do_sample:
        settings.update(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p, seed=options.seed)
    return json.loads(json.dumps(settings))


def check_run_settings(output: str, settings: Dict[str, Any], rank: int) -> None:
    """Refuse to resume into ``output`` when its ``run.json`` holds other settings; write it at the first start."""
    path = os.path.join(output, RUN_FILE)
    recorded = _read_json(path) if os.path.exists(path) else None
    if recorded is not None and recorded != settings:
        changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
        detail = "; ".join(f"{k}: {recorded.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ValueError(f"{path}: this --output holds predictions of a run with other settings ({detail}); "
                         "resuming would mix them: use a fresh --output (or the original arguments)")
    _barrier()  # every rank has compared before rank 0 writes
    if rank == 0 and recorded is None:
        atomic_write_json(path, settings)


class Generator:
    """The loaded export + tokenizers; ``answer(items)`` -> one record per item (also used by bench/)."""

    def __init__(self, options: EvalOptions, model: Any, tokenizer: Any, image_tokenizer: Any, device: str,
                 dtype: torch.dtype) -> None:
        from libra_megatron.inference import vocab_of

        self.options, self.device, self.dtype = options, device, dtype
        self.model, self.tokenizer, self.image_tokenizer = model, tokenizer, image_tokenizer
        self.vocab = vocab_of(self.model.config)
        if self.tokenizer.vocab_size != self.vocab.text_vocab_size:
            raise ValueError(f"{getattr(tokenizer, 'model_path', 'tokenizer')}: {self.tokenizer.vocab_size} text ids, "
                             f"the model expects {self.vocab.text_vocab_size}")
        self.chat = _effective_template(options) == "chat"
        self.max_new_tokens = _effective_max_new_tokens(options)

    @classmethod
    def load(cls, options: EvalOptions, folder: str, device: str, dtype: torch.dtype) -> "Generator":
        """From an HF export folder (``AutoModelForCausalLM`` with the export's own code) and the tokenizers."""
        from transformers import AutoModelForCausalLM

        from libra_megatron.data.text_tokenizer import TextTokenizer
        from libra_megatron.inference import load_image_tokenizer

        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device).eval()
        tokenizer = TextTokenizer(options.tokenizer or os.path.join(folder, "tokenizer.model"))
        image_tokenizer = load_image_tokenizer(options.vision_tokenizer or folder, device)
        return cls(options, model, tokenizer, image_tokenizer, device, dtype)

    def _question(self, item: EvalItem) -> str:
        if self.options.prompt is not None:
            return self.options.prompt if self.options.task == "caption" else f"{item.question}{self.options.prompt}"
        if self.options.task == "caption" and self.chat:
            return CAPTION_CHAT_PROMPT
        return item.question

    @torch.no_grad()
    def answer(self, items: Sequence[EvalItem]) -> List[Dict[str, Any]]:
        """Generate for a batch; bad images become ``skipped`` records."""
        from libra_megatron.inference import decode_output, prepare_batch
        from libra_megatron.tokenizer.image_processing import load_image, preprocess_image

        records: Dict[str, Dict[str, Any]] = {}
        good, pixels = [], []
        for item in items:
            if not os.path.isfile(item.image):
                records[item.item_id] = {"id": item.item_id, "skipped": f"missing image: {item.image}"}
                continue
            try:
                pixels.append(preprocess_image(load_image(item.image)))
                good.append(item)
            except (ValueError, OSError) as error:
                records[item.item_id] = {"id": item.item_id, "skipped": f"corrupt image: {error}"}
        if good:
            codes, features = self.image_tokenizer.encode(torch.stack(pixels).to(self.device))
            batch = prepare_batch(self.tokenizer, self.vocab, [self._question(i) for i in good], codes.cpu(),
                                  features.float().cpu(), chat=self.chat)
            generator = None
            if self.options.do_sample:
                generator = torch.Generator(self.device).manual_seed(
                    self.options.seed * 1_000_003 + zlib.crc32(good[0].item_id.encode()))
            out = self.model.generate(
                batch.input_ids.to(self.device), vision_indices=batch.vision_indices.to(self.device),
                attention_mask=batch.attention_mask.to(self.device),
                contiguous_signal=batch.contiguous_signal.to(self.device, self.dtype),
                max_new_tokens=self.max_new_tokens, do_sample=self.options.do_sample,
                temperature=self.options.temperature, top_k=self.options.top_k, top_p=self.options.top_p,
                generator=generator, return_dict_in_generate=True)
            prompt_len = batch.input_ids.shape[-1]
            for b, item in enumerate(good):
                answer = decode_output(self.tokenizer, self.vocab, out.sequences[:, b, prompt_len:].cpu(),
                                       out.vision_indices[b, prompt_len:].cpu())
                text = answer.text.split("\n")[0].strip() if self.options.task == "caption" else answer.text
                records[item.item_id] = {"id": item.item_id, "prediction": text, "new_tokens": answer.new_tokens}
        return [records[item.item_id] for item in items]


def run_evaluation(options: EvalOptions) -> Optional[Dict[str, Any]]:
    """Run (or resume) one evaluation; returns the summary on rank 0 (``None`` on other ranks)."""
    rank, world = _dist()
    started = time.perf_counter()
    device = options.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    dtype_name = options.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    items = load_items(options.task, options.data, options.annotations, options.image_root, options.split,
                       options.image_pattern)
    if options.limit:
        items = items[: options.limit]
    os.makedirs(options.output, exist_ok=True)
    check_run_settings(options.output, run_settings(options, dtype_name), rank)
    folder = resolve_model(options, rank, "fp32" if dtype_name == "fp32" else "bf16")
    finished = read_finished(options.output)
    _barrier()  # every rank has read the same finished set before anyone appends
    todo = [item for item in items if item.item_id not in finished][rank::world]
    generated, generate_seconds = 0, 0.0
    if todo:
        generator = Generator.load(options, folder, device, dtype)
        writer = PredictionWriter(options.output, rank)
        bar = None
        if options.progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"{options.task} (rank 0 of {world})", unit="item")
        try:
            for start in range(0, len(todo), options.batch_size):
                chunk = todo[start: start + options.batch_size]
                tick = time.perf_counter()
                records = generator.answer(chunk)
                generate_seconds += time.perf_counter() - tick
                writer.write(records)
                generated += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            writer.close()
            if bar is not None:
                bar.close()
    seconds = time.perf_counter() - started
    totals = torch.tensor([float(generated), seconds, generate_seconds], dtype=torch.float64)
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
            totals = totals.cuda()
        dist.all_reduce(totals[:1])
        dist.all_reduce(totals[1:], op=dist.ReduceOp.MAX)
    totals = totals.cpu()
    _barrier()
    if rank != 0:
        return None
    records = read_finished(options.output)
    write_merged(options.output, [item.item_id for item in items], records)
    info = {"data": options.data, "model": options.model, "world_size": world, "resumed_items": len(finished),
            "generated_items": int(totals[0]), "seconds": round(float(totals[1]), 3),
            "generate_seconds": round(float(totals[2]), 3),
            # throughput of the generation loop (image loading + tokenizer + generate), all ranks together
            "items_per_second": round(float(totals[0]) / max(float(totals[2]), 1e-9), 4),
            "generation": {"do_sample": options.do_sample, "temperature": options.temperature, "top_k": options.top_k,
                           "top_p": options.top_p, "seed": options.seed, "batch_size": options.batch_size,
                           "max_new_tokens": options.max_new_tokens, "template": options.template,
                           "device": device, "dtype": dtype_name}}
    summary = build_summary(options.task, items, records, info, options.caption_metrics, options.caption_tokenizer)
    write_summary(options.output, summary)
    print(markdown_table(summary), flush=True)
    return summary

