"""factorport's calibration as llama.cpp's importance matrix, on a tiny
random Llama: the conversion keeps each linear's Σ x² per input column
(XᵀX's diagonal), the GGUF export writes it as imatrix.gguf under llama.cpp's
tensor names, and the real `llama-quantize --imatrix` reads it and quantizes
differently with it. Bad files are refused in one line."""

from __future__ import annotations

import pytest
import torch
import transformers
from gguf import GGUFReader

import factorport
from factorport.api import DEFAULT_CALIB
from factorport.converters.calibration import collect, token_sequences
from factorport.errors import FactorportError
from factorport.formats import input_sums
from factorport.formats.gguf import IMATRIX_FILE, MODEL_FILE
from factorport.formats.gguf.imatrix import read_imatrix
from factorport.llamacpp.tools import run_tool
from factorport.recipe import parse_recipe

from tiny_outputs import tiny_source

SAMPLES, SEQ_LEN = 4, 64
STATISTICS_ONLY = f"name: stats\ncalibration: {{samples: {SAMPLES}, seq_len: {SEQ_LEN}, mode: parallel}}\nsteps: []\n"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_source(tmp_path_factory.mktemp("imatrix") / "source", layers=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def output(source, tmp_path_factory):
    recipe = tmp_path_factory.mktemp("recipe") / "stats.yaml"
    recipe.write_text(STATISTICS_ONLY)
    out = tmp_path_factory.mktemp("out") / "out"
    return factorport.convert(str(source), recipe=str(recipe), output=out, formats=["gguf"], progress=False)


def test_a_recipe_without_steps_needs_its_calibration_section():
    assert parse_recipe(STATISTICS_ONLY).needs_calibration
    with pytest.raises(FactorportError, match=r"or 'steps: \[\]' with a calibration section"):
        parse_recipe("steps: []\n")


def test_the_sums_are_each_linears_calibration_gram_diagonal(source, output):
    stats = input_sums.read(output / input_sums.FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    sequences = token_sequences(tokenizer, str(DEFAULT_CALIB), SAMPLES, SEQ_LEN)
    with torch.no_grad():
        dense = collect(model, sequences, progress=False)  # parallel mode: the uncompressed model's inputs
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(stats.sums) == sorted(linears) and "lm_head" in stats.sums
    assert (stats.tokens, stats.seq_len) == (SAMPLES * SEQ_LEN, SEQ_LEN)
    for name in linears:
        expected = dense.xtx(name).diagonal().float()
        assert torch.allclose(stats.sums[name], expected, rtol=1e-4), name


def test_imatrix_gguf_names_every_weight_llama_imatrix_would_record(output):
    stats = input_sums.read(output / input_sums.FILE)
    sums, counts, keys = read_imatrix(output / "gguf" / IMATRIX_FILE)
    weights = {t.name for t in GGUFReader(output / "gguf" / MODEL_FILE).tensors if t.name.endswith(".weight") and len(t.shape) == 2}
    assert set(sums) == weights - {"token_embd.weight"}  # the embedding is a lookup, never recorded
    assert all(float(c[0]) == SAMPLES * SEQ_LEN for c in counts.values())
    assert keys["imatrix.chunk_count"] == SAMPLES and keys["imatrix.chunk_size"] == SEQ_LEN
    assert sums["blk.1.ffn_down.weight"] == pytest.approx(stats.sums["model.layers.1.mlp.down_proj"].numpy())
    assert sums["output.weight"] == pytest.approx(stats.sums["lm_head"].numpy())


def test_llama_quantize_reads_it_and_quantizes_otherwise(output, tmp_path):
    gguf_dir = output / "gguf"
    plain, weighted = tmp_path / "q4.gguf", tmp_path / "q4-imatrix.gguf"
    run_tool("llama-quantize", [str(gguf_dir / MODEL_FILE), str(plain), "Q4_0"], timeout=300)
    done = run_tool("llama-quantize", ["--imatrix", str(gguf_dir / IMATRIX_FILE), str(gguf_dir / MODEL_FILE), str(weighted), "Q4_0"], timeout=300)
    assert "loaded 15 importance matrix entries" in done.stdout + done.stderr
    fields = GGUFReader(weighted).fields
    assert fields["quantize.imatrix.entries_count"].contents() == 15
    blocks = {t.name: bytes(t.data) for t in GGUFReader(plain).tensors}
    changed = [t.name for t in GGUFReader(weighted).tensors if t.tensor_type.name == "Q4_0" and bytes(t.data) != blocks[t.name]]
    assert "blk.0.attn_q.weight" in changed  # the importance weights moved the int4 grid
    from factorport.formats.gguf.checks import check_model

    check_model(weighted)  # llama-quantize's quantize.imatrix.* keys do not make the file suspect


def test_damaged_input_sums_are_refused(output, tmp_path):
    stats = input_sums.read(output / input_sums.FILE)
    stats.sums["lm_head"] = -stats.sums["lm_head"]
    bad = tmp_path / "sums.safetensors"
    input_sums.write(bad, stats)
    with pytest.raises(FactorportError, match="negative or non-finite sums of squares"):
        input_sums.read(bad)


def test_a_gguf_that_is_not_an_imatrix_is_refused(output):
    with pytest.raises(FactorportError, match="general.type is not 'imatrix'"):
        read_imatrix(output / "gguf" / MODEL_FILE)
