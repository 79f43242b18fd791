"""The training data stream: which global samples each data-parallel rank reads at each step, resumable exactly.

Step ``k`` of a run consumes global samples ``[c, c + GBS)`` where ``c`` = samples consumed before it. They are
taken in chunks of ``MBS x DP``; DP rank ``r`` reads slice ``r`` of each chunk as one micro-batch (Megatron-LM's
``MegatronPretrainingSampler``, implemented by the data package's ``ResumableBatchSampler``). Every rank of a
model-parallel group reads the same micro-batches itself (random access into mmap'ed binaries is cheap, and the
page cache is shared on a node), so no batch broadcast is needed and every pipeline stage has the routing indices
and positions it needs. After a resume the stream restarts at the
checkpoint's consumed-sample count, so the run sees exactly the samples an uninterrupted run would.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from libra_megatron.utils.transfer import to_device_async

# Routing is planned on the host (docs/design.md, "Model"): these stay in CPU memory, the rest goes to the GPU.
# "routing" (a family's prepare_batch result) is already placed where it belongs.
HOST_KEYS = frozenset({"vision_indices", "segment_ids", "sample_ids", "routing"})


def dataset_files(prefix: str) -> List[str]:
    """Files one ``--data-path`` prefix needs (tools/preprocess_images.py output: binaries + sidecar)."""
    return [prefix + ".bin", prefix + ".idx", prefix + ".json"]


def build_train_dataset(args: argparse.Namespace, vocab: Any) -> Tuple[Any, int]:
    """The training dataset and its sample count (``train_iters x global batch``): ``--mock-data`` samples, or the
    preprocessed binaries of ``--data-path`` (blended by weight)."""
    if args.mock_data:
        from libra_megatron.training.mock_data import MockPretrainDataset

        return MockPretrainDataset(vocab, args.seq_length, seed=args.seed), args.train_iters * args.global_batch_size
    dataset = _blended_dataset(args, args.data_blend, args.train_iters * args.global_batch_size, vocab)
    return dataset, len(dataset)


# --mock-data validation draws from another seed than training, so it is a held-out stream of the same task.
MOCK_VALID_SEED_OFFSET = 7919


def build_valid_dataset(args: argparse.Namespace, vocab: Any) -> Tuple[Any, int]:
    """The validation dataset and the samples one evaluation reads (``eval_iters x global batch``): the binaries
    of ``--valid-data-path`` (blended by weight, ordered by ``--data-seed`` like training), or with
    ``--mock-data`` a synthetic stream disjoint from the training one (another seed)."""
    samples = args.eval_iters * args.global_batch_size
    if args.mock_data:
        from libra_megatron.training.mock_data import MockPretrainDataset

        return MockPretrainDataset(vocab, args.seq_length, seed=args.seed + MOCK_VALID_SEED_OFFSET), samples
    return _blended_dataset(args, args.valid_blend, samples, vocab), samples


def _blended_dataset(args: argparse.Namespace, blend: List[Tuple[float, str]], num_samples: int, vocab: Any) -> Any:
    from libra_megatron.data.dataset import LibraDataset, LibraDatasetConfig

    weights = [weight for weight, _ in blend]
    config = LibraDatasetConfig(
        prefixes=[prefix for _, prefix in blend], seq_length=args.seq_length,
        weights=weights if len(weights) > 1 else None, num_samples=num_samples,
        seed=args.data_seed if args.data_seed is not None else args.seed, packing=args.packing,
        cache_dir=args.data_cache_path,
    )
    return LibraDataset(config, vocab=vocab)


TRAIN_EXHAUSTED = "the dataset ran out of samples (it holds --train-iters x --global-batch-size)"


class MicroBatchStream:
    """Micro-batches of this DP rank, step by step, from a dataset indexed by global sample index (the training
    stream, and under :class:`~libra_megatron.training.evaluation.ValidationStream` the validation one).

    ``loader_seed`` gives the DataLoader its own generator for the workers' base seed (otherwise it draws from the
    global torch RNG, as the training stream does); ``start=False`` defers the first iterator to the first step.
    """

    def __init__(self, dataset: Any, total_samples: int, args: argparse.Namespace, consumed_samples: int,
                 dp_rank: int, dp_size: int, vocab: Any, prepare: Optional[Callable[[Dict], None]] = None, *,
                 prefetch_factor: int = 4, loader_seed: Optional[int] = None, start: bool = True,
                 exhausted: str = TRAIN_EXHAUSTED) -> None:
        from libra_megatron.data.dataset import ResumableBatchSampler
        from libra_megatron.training.padding import build_collate

        self.prepare = prepare  # per host micro-batch, before stats and the device copy (ModelFamily.prepare_batch)
        self.num_microbatches = args.num_microbatches
        self.vocab = vocab
        self.pipeline_parallel = args.pipeline_model_parallel_size
        total_samples = max(total_samples, consumed_samples)
        sampler = ResumableBatchSampler(total_samples, consumed_samples, args.micro_batch_size, dp_rank, dp_size)
        workers = args.num_workers
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=workers, collate_fn=build_collate(args, vocab),
            pin_memory=args.device == "cuda", persistent_workers=workers > 0,
            prefetch_factor=prefetch_factor if workers > 0 else None,
            generator=torch.Generator().manual_seed(loader_seed) if loader_seed is not None else None,
        )
        self.exhausted = exhausted
        self._iterator = iter(self.loader) if start else None
        self.device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else None

    def restart(self) -> None:
        """Continue from the sampler's first sample again (the validation stream, at every evaluation)."""
        self._iterator = iter(self.loader)

    def next_step(self) -> Tuple[List[Dict[str, torch.Tensor]], Any]:
        """The ``num_microbatches`` micro-batches of the next step (on the training device) and their token counts
        (:class:`~libra_megatron.training.model_family.BatchStats`, computed on the host copies). With dynamic
        padding and PP > 1 the micro-batches are padded to the step's longest (one shape per step)."""
        from libra_megatron.training.model_family import BatchStats, batch_stats
        from libra_megatron.training.padding import align_step

        if self._iterator is None:
            self.restart()
        try:
            batches = [next(self._iterator) for _ in range(self.num_microbatches)]
        except StopIteration:
            raise RuntimeError(self.exhausted)
        batches, _ = align_step(batches, self.vocab, self.pipeline_parallel)  # before the routing is built
        stats = BatchStats()
        for batch in batches:
            if self.prepare is not None:
                self.prepare(batch)
            stats.add(batch_stats(batch, self.vocab))
        if self.device is not None:
            batches = [to_device(batch, self.device) for batch in batches]
        return batches, stats


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """The micro-batch on ``device`` except :data:`HOST_KEYS`; asynchronous copies (tensors not already pinned
    by the loader, e.g. re-padded ones, are pinned first so the copy never waits for the GPU)."""
    out = {}
    for key, value in batch.items():
        if key in HOST_KEYS or not isinstance(value, torch.Tensor) or value.device.type != "cpu":
            out[key] = value
            continue
        out[key] = to_device_async(value, device)
    return out
