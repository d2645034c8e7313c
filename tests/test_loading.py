"""Loading a saved model's tokenizer with its family's options."""

import json
import logging

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from factorport.loading import saved_tokenizer


def _large_vocabulary_dir(path, model_type):
    # over 100k tokens and a pre-tokenizer: what transformers 4.57.3+ checks for Mistral's regex
    vocab = {f"t{i}": i for i in range(100_001)}
    vocab["[UNK]"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "transformers_version": "4.57.6"}))
    return path


@pytest.fixture
def transformers_warnings(caplog):
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            yield lambda: [r.getMessage() for r in caplog.records if "incorrect regex" in r.getMessage()]
    finally:
        transformers.logging.disable_propagation()


def test_no_false_mistral_regex_alarm_for_other_families(tmp_path, transformers_warnings):
    directory = _large_vocabulary_dir(tmp_path, "qwen2")
    transformers.AutoTokenizer.from_pretrained(directory)
    assert transformers_warnings(), "transformers no longer raises the alarm: tokenizer_options can go"
    before = len(transformers_warnings())
    tokenizer = saved_tokenizer(directory)
    assert len(transformers_warnings()) == before
    assert tokenizer("t5 t100000")["input_ids"] == [5, 100_000]


def test_mistral_tokenizers_keep_transformers_judgement(tmp_path, transformers_warnings):
    saved_tokenizer(_large_vocabulary_dir(tmp_path, "mistral"))
    assert transformers_warnings()
