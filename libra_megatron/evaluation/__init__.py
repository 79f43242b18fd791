"""Evaluation of Libra checkpoints: captioning (pycocoevalcap), VQA accuracy, multiple choice / yes-no.

``tasks`` reads the data formats, ``runner`` generates (batched, data-parallel, resumable) with an HF export,
``scoring`` / ``answer_normalization`` compute the metrics, ``report`` writes the summary; ``engine_captioning``
is the zero-shot captioning the trainer runs with its own model. See docs/design.md ("Evaluation").
"""
