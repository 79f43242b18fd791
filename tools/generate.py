#!/usr/bin/env python
"""Caption or answer questions about images with an exported HF Libra model; one JSON line per image.

    python tools/generate.py --model EXPORT_DIR --image duck.jpg --prompt "Why is this image funny?"
    python tools/generate.py --model libra-11b-base --raw --image a.jpg --image b.jpg     # captions
    python tools/generate.py --model EXPORT_DIR --image a.jpg --do-sample --temperature 0.7 --top-p 0.9 --device cuda

The model loads through ``AutoModelForCausalLM.from_pretrained(--model, trust_remote_code=True)`` (the modeling
code shipped in the export); the text tokenizer is ``<model>/tokenizer.model`` and the image tokenizer is read
from ``--vision-tokenizer`` (default: the model folder). ``--prompt`` may be given once (used for every image)
or once per image. Generated images, if any, are written as PNG to ``--save-images``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported HF Libra folder")
    parser.add_argument("--image", action="append", required=True, help="image file (repeat for a batch)")
    parser.add_argument("--prompt", action="append", default=None, help="question (once, or once per image)")
    parser.add_argument("--raw", action="store_true", help="no chat template (Libra-Base): <s> image \\n prompt")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece model (default <model>/tokenizer.model)")
    parser.add_argument("--vision-tokenizer", default=None, help="vision tokenizer folder (default: --model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-images", default=None, help="folder for generated images (PNG)")
    args = parser.parse_args(argv)
    prompts = args.prompt or [""]
    if len(prompts) not in (1, len(args.image)):
        parser.error(f"--prompt given {len(prompts)} times for {len(args.image)} images (give it once or per image)")
    args.prompt = prompts * len(args.image) if len(prompts) == 1 else prompts
    if not args.raw and not all(args.prompt):
        parser.error("the chat template needs a --prompt question (or pass --raw to caption)")
    args.dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM

    from libra_megatron.data.text_tokenizer import TextTokenizer
    from libra_megatron.inference import decode_output, load_image_tokenizer, prepare_batch, vocab_of
    from libra_megatron.tokenizer.image_processing import load_image, preprocess_image

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=args.dtype)
    model = model.to(args.device).eval()
    tokenizer = TextTokenizer(args.tokenizer or os.path.join(args.model, "tokenizer.model"))
    image_tokenizer = load_image_tokenizer(args.vision_tokenizer or args.model, args.device)
    vocab = vocab_of(model.config)
    if tokenizer.vocab_size != vocab.text_vocab_size:
        raise SystemExit(f"{tokenizer.model_path}: {tokenizer.vocab_size} text ids, the model expects {vocab.text_vocab_size}")
    pixels = torch.stack([preprocess_image(load_image(path)) for path in args.image]).to(args.device)
    codes, features = image_tokenizer.encode(pixels)
    batch = prepare_batch(tokenizer, vocab, args.prompt, codes.cpu(), features.float().cpu(), chat=not args.raw)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    out = model.generate(
        batch.input_ids.to(args.device), vision_indices=batch.vision_indices.to(args.device),
        attention_mask=batch.attention_mask.to(args.device),
        contiguous_signal=batch.contiguous_signal.to(args.device, args.dtype), max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, num_beams=args.num_beams, return_dict_in_generate=True,
    )
    seconds = time.perf_counter() - started
    prompt_len = batch.input_ids.shape[-1]
    for b, path in enumerate(args.image):
        answer = decode_output(tokenizer, vocab, out.sequences[:, b, prompt_len:].cpu(), out.vision_indices[b, prompt_len:].cpu())
        saved = []
        if answer.image_spans and args.save_images:
            from PIL import Image

            from libra_megatron.tokenizer.image_processing import unit_range_to_pixels

            os.makedirs(args.save_images, exist_ok=True)
            images = image_tokenizer.decode_tokens(torch.stack(answer.image_spans, dim=1).to(args.device), vocab)
            for n, image in enumerate(unit_range_to_pixels(images.float().cpu())):
                target = os.path.join(args.save_images, f"{os.path.splitext(os.path.basename(path))[0]}_{n}.png")
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(target)
                saved.append(target)
        print(json.dumps({"image": path, "prompt": args.prompt[b], "text": answer.text, "new_tokens": answer.new_tokens,
                          "generated_images": saved, "generate_seconds": round(seconds, 3),
                          "load_seconds": round(load_seconds, 3), "device": args.device}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
