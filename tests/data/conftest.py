"""Shared fixtures of the data tests: a tiny LLaMA-style sentencepiece model and the preprocessing defaults."""
import pytest

from libra_megatron.data.sentencepiece_training import train_sentencepiece
from libra_megatron.data.text_tokenizer import TextTokenizer


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm") / "tiny.model", vocab_size=512)


@pytest.fixture(scope="session")
def text_tokenizer(sp_model_path):
    return TextTokenizer(sp_model_path)


@pytest.fixture(scope="session")
def image_tokenizer():
    from libra_megatron.tokenizer.image_tokenizer import ImageTokenizer

    return ImageTokenizer.tiny(0).frozen()
