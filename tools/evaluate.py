#!/usr/bin/env python
"""Score a Libra checkpoint on captioning, VQA or multiple-choice / yes-no questions.

    python tools/evaluate.py --task caption --data dataset_coco.json --image-root coco/ --model libra-11b-base \\
        --output eval/coco
    python tools/evaluate.py --task vqa --data v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --image-root coco/val2014 --model EXPORT --output eval/vqav2
    python tools/evaluate.py --task choice --data pope_adversarial.jsonl --image-root coco/val2014 \\
        --model runs/instruct --tokenizer llama2/tokenizer.model --vision-tokenizer vision-tokenizer --output eval/pope
    torchrun --nproc_per_node 8 tools/evaluate.py ...        # data-parallel; rank 0 merges and scores

``--model`` is an HF export or an engine checkpoint (converted into ``OUTPUT/hf_export``, reused while the
checkpoint and dtype stay the same). Predictions go to ``OUTPUT/predictions.jsonl`` (a killed run rerun with the
same command resumes after the last finished batch; other settings into the same OUTPUT are refused, see
``OUTPUT/run.json``), scores to ``OUTPUT/summary.json`` and ``OUTPUT/summary.md``. Formats, prompts and metrics: docs/design.md
("Evaluation").
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if TYPE_CHECKING:
    from libra_megatron.evaluation.runner import EvalOptions


def parse_args(argv: Optional[Sequence[str]] = None) -> EvalOptions:
    """The CLI flags as :class:`~libra_megatron.evaluation.runner.EvalOptions`."""
    from libra_megatron.evaluation.runner import EvalOptions
    from libra_megatron.evaluation.tasks import TASKS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--data", required=True, help="captions / questions file (see docs/design.md 'Evaluation')")
    parser.add_argument("--annotations", default=None, help="VQAv2 annotation file (answers)")
    parser.add_argument("--image-root", default=None, help="folder image paths are relative to (default: --data's)")
    parser.add_argument("--image-pattern", default=None, help="VQA image name from image_id, e.g. '{image_id}.jpg'")
    parser.add_argument("--split", default="test", help="Karpathy split to evaluate ('' = all)")
    parser.add_argument("--model", required=True, help="HF export folder or engine checkpoint (--save root / iter_*)")
    parser.add_argument("--output", required=True, help="folder for predictions and the summary (resumes)")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece model (default <model>/tokenizer.model)")
    parser.add_argument("--vision-tokenizer", default=None, help="vision tokenizer folder (default: the model's)")
    parser.add_argument("--template", default="auto", choices=["auto", "raw", "chat"],
                        help="auto: raw for caption (base model), vicuna_v1 chat for vqa/choice")
    parser.add_argument("--prompt", default=None, help="caption prompt, or a suffix after vqa/choice questions")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 30 caption, 16 vqa, 8 choice")
    parser.add_argument("--do-sample", action="store_true", help="sample (seeded) instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default cuda:LOCAL_RANK when available, else cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default bf16 on cuda")
    parser.add_argument("--limit", type=int, default=None, help="only the first N items")
    parser.add_argument("--caption-metrics", default="cider,bleu,meteor,spice",
                        help="comma list of cider, bleu, meteor, spice (meteor/spice need Java)")
    parser.add_argument("--caption-tokenizer", choices=["ptb", "simple"], default=None,
                        help="default ptb (pycocoevalcap, needs Java) when Java is installed, else simple")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return EvalOptions(
        task=args.task, data=args.data, model=args.model, output=args.output, annotations=args.annotations,
        image_root=args.image_root, image_pattern=args.image_pattern, split=args.split, tokenizer=args.tokenizer,
        vision_tokenizer=args.vision_tokenizer, template=args.template, prompt=args.prompt,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, device=args.device,
        dtype=args.dtype, limit=args.limit, caption_metrics=tuple(m for m in args.caption_metrics.split(",") if m),
        caption_tokenizer=args.caption_tokenizer, progress=not args.no_progress)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the evaluation; exit code 0 when it finished (items skipped for bad images included)."""
    from libra_megatron.evaluation.runner import run_evaluation

    run_evaluation(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
