"""Every load path checks the manifest's sha256 first and refuses, in one
line naming the file, before any runtime reads anything; --no-verify /
verify=False skips it and says so. Thresholds travel in the manifest."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import crashing_backends
import factorport
from factorport.cli import main
from factorport.errors import FactorportError
from factorport.formats import safetensors_dir
from factorport.validators.backends import BACKENDS
from tiny_outputs import RECIPE, TEXT, tiny_output

CHANGED = "safetensors/config.json"


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return tiny_output(tmp_path_factory.mktemp("gate"))


@pytest.fixture
def changed(output, tmp_path):
    """A copy of the output with one file changed after convert."""
    copy = tmp_path / "changed"
    shutil.copytree(output, copy)
    with open(copy / CHANGED, "a") as fh:
        fh.write("\n")
    return copy


def test_load_refuses_a_changed_file_and_verify_false_skips(changed):
    for path in (changed, changed / "safetensors"):  # the manifest beside or above the artifact
        with pytest.raises(FactorportError) as caught:
            factorport.load(path)
        message = str(caught.value)
        assert f"manifest.json: {CHANGED}: " in message and "--no-verify" in message and "\n" not in message
    model, tokenizer = factorport.load(changed, verify=False)
    assert model.config.hidden_size == 64


def test_a_bare_safetensors_dir_without_manifest_loads(output, tmp_path):
    model, tokenizer = factorport.load(output)
    bare = tmp_path / "bare"
    bare.mkdir()
    safetensors_dir.save(model, tokenizer, bare)
    assert factorport.load(bare)[0].config.num_hidden_layers == 2


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("factorport: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "{out}", "--windows", "1", "--no-reference", "--quiet"],
        ["eval", "{out}", "--backend", "llama.cpp", "--windows", "1", "--no-reference", "--quiet"],
        ["generate", "{out}", "--prompt", "hi", "--new-tokens", "2"],
        ["export", "{out}", "--format", "onnx", "--force", "--quiet"],
        ["bench", "{out}", "--backend", "torch", "--no-anchors", "--quiet"],
    ],
)
def test_every_command_refuses_a_changed_file(monkeypatch, changed, capsys, command):
    # a runtime that crashes on open: if anything got past the gate, the error would say so
    entry = dataclasses.replace(BACKENDS["llama.cpp"], cls=f"{crashing_backends.__name__}:SegfaultOnOpen")
    monkeypatch.setitem(BACKENDS, "llama.cpp", entry)
    before = sorted(p.name for p in changed.rglob("*"))
    assert main([arg.format(out=changed) for arg in command]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"manifest.json: {CHANGED}: " in line and "--no-verify" in line
    assert sorted(p.name for p in changed.rglob("*")) == before  # nothing written either


def test_validate_fails_a_changed_file_in_its_report(changed, capsys):
    assert main(["validate", str(changed), "--text", str(TEXT), "--quiet"]) == 1
    result = json.loads((changed / "report" / "validation.json").read_text())
    assert len(result["failures"]) == 1 and result["failures"][0].startswith(f"manifest: {CHANGED}: ")
    assert result["reference"] is None  # nothing ran


def test_no_verify_runs_and_says_so(changed, capsys):
    assert main(["eval", str(changed), "--windows", "1", "--text", str(TEXT), "--no-reference", "--quiet", "--no-verify"]) == 0
    captured = capsys.readouterr()
    assert "factorport: not checking manifest.json (--no-verify)" in captured.err.splitlines()
    assert "perplexity (" in captured.out


def test_no_verify_validate_marks_the_manifest_unchecked(monkeypatch, changed, tmp_path, capsys):
    entry = dataclasses.replace(BACKENDS["onnxruntime"], cls=f"{crashing_backends.__name__}:ReferenceInChild")
    monkeypatch.setitem(BACKENDS, "onnxruntime", entry)
    junit = tmp_path / "v.xml"
    status = main(["validate", str(changed), "--backend", "onnxruntime", "--windows", "1", "--text", str(TEXT),
                   "--junit", str(junit), "--quiet", "--no-verify"])
    assert status == 0
    assert "factorport: not checking manifest.json (--no-verify)" in capsys.readouterr().err
    assert "manifest.json not checked" in (changed / "report" / "validation.md").read_text()
    assert "<skipped" in junit.read_text()


def test_thresholds_stored_at_convert_time_hold(monkeypatch, tmp_path):
    entry = dataclasses.replace(BACKENDS["onnxruntime"], cls=f"{crashing_backends.__name__}:ReferenceInChild")
    monkeypatch.setitem(BACKENDS, "onnxruntime", entry)
    recipe = RECIPE + "validate: {thresholds: {'onnxruntime:top1_agreement': 0.5}}\n"
    out = tiny_output(tmp_path / "a", recipe=recipe)
    info = json.loads((out / "manifest.json").read_text())
    assert info["validation"] == {"thresholds": {"onnxruntime:top1_agreement": 0.5}}

    def top1_threshold() -> str:
        result = factorport.validate(out, backends=["onnxruntime"], text=TEXT, windows=1, progress=False)
        return next(c["threshold"] for c in result["backends"]["onnxruntime"]["checks"] if c["check"] == "top1_agreement")

    assert top1_threshold() == ">= 0.5"
    # an artifact written before thresholds were stored: the defaults, whatever its recipe text says
    del info["validation"]
    (out / "manifest.json").write_text(json.dumps(info))
    assert top1_threshold() == ">= 1"


def test_validate_module_does_not_read_recipes():
    source = Path(factorport.__file__).parent / "validators" / "validate.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not any(name.endswith("recipe") for name in imported), imported


def test_export_vouches_only_for_what_it_wrote(changed, capsys):
    """export --no-verify re-hashes the files it wrote, not the one changed
    behind the manifest's back: that change stays a problem."""
    from factorport.formats.manifest import verify_manifest

    (changed / "extra.txt").write_text("added after convert")
    assert main(["export", str(changed), "--format", "gguf", "--no-verify", "--force"]) == 0
    assert "not checking manifest.json (--no-verify)" in capsys.readouterr().err
    problems = verify_manifest(changed)
    assert sorted(p.split(":")[0] for p in problems) == sorted([CHANGED, "extra.txt"])
    info = json.loads((changed / "manifest.json").read_text())
    assert "gguf/model.gguf" in info["files"] and "extra.txt" not in info["files"]
