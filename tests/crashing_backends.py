"""Test-only backends, run in the isolated child process by naming them as
"module:Class" in a BACKENDS entry a test registers for itself: they crash
(a real SIGSEGV, the signal a native runtime dies of), hang, or answer."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from factorport.errors import FactorportError
from factorport.validators.backends import Generation


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(60)  # never reached: the signal's default action ends the process


class SegfaultOnOpen:
    @classmethod
    def open(cls, artifact: Path, **options):
        segfault()


class Counting:
    """Answers without a model: logits[i, j] = ids[i] * 1000 + j, so a test
    can tell exactly what the child computed from what it was sent."""

    name = "counting"
    vocab = 16

    def __init__(self, artifact: Path) -> None:
        self.artifact = artifact
        self.load_seconds = 0.25

    @classmethod
    def open(cls, artifact: Path, **options):
        if options:
            raise FactorportError(f"{artifact}: unexpected options {sorted(options)}")
        return cls(artifact)

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def text_start(self) -> list[int]:
        return []

    def detokenize(self, ids) -> str:
        return "".join(chr(i) for i in ids)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids).reshape(-1)
        if len(ids) > 64:
            raise FactorportError(f"{len(ids)} tokens do not fit a context of 64; use shorter windows")
        return ids.float()[:, None] * 1000 + torch.arange(self.vocab, dtype=torch.float32)

    def generate(self, ids, new_tokens: int) -> Generation:
        return Generation([int(ids[-1]) + k + 1 for k in range(new_tokens)], 0.5, [0.1] * (new_tokens - 1))


class SegfaultOnLogits(Counting):
    def logits(self, ids):
        segfault()


class HangOnLogits(Counting):
    def logits(self, ids):
        time.sleep(3600)


class ReferenceInChild:
    """The torch reference of the output, opened in the child: what a backend
    that agrees with it gives."""

    @classmethod
    def open(cls, artifact: Path, **options):
        from factorport.validators.backends.torch_backend import TorchBackend

        return TorchBackend.open(Path(artifact).parent / "safetensors")


class HangOnGenerate(Counting):
    def generate(self, ids, new_tokens: int):
        time.sleep(3600)
