"""Shared fixtures: generated class folders, a tiny-model CLI runner. No network anywhere."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]

# A tiny ViT on 32x32 inputs with 4-pixel patches (8x8 tokens): the tests' standard backbone.
TINY_VIT = [
    "--model.init_args.backbone.name", "vit_tiny_patch16_224",
    "--model.init_args.backbone.img_size", "32",
    "--model.init_args.backbone.patch_size", "4",
    "--model.init_args.backbone.kwargs", "{embed_dim: 32, depth: 2, num_heads: 2}",
]

# Short runs: a few batches, CPU, no progress bar noise.
FAST_TRAINER = [
    "--trainer.accelerator", "cpu",
    "--trainer.devices", "1",
    "--trainer.max_epochs", "1",
    "--trainer.limit_train_batches", "3",
    "--trainer.limit_val_batches", "2",
    "--trainer.limit_test_batches", "2",
    "--trainer.enable_progress_bar", "false",
    "--trainer.callbacks", "[]",
    "--data.init_args.num_workers", "0",
    "--data.init_args.batch_size", "16",
]


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 40,
                      splits: tuple[str, ...] = ("train", "val")) -> Path:
    """A class-folder tree of random RGB PNGs: root/<split>/<class>/<i>.png."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                # class-dependent mean so a model can learn something
                pixels = rng.normal(60 + 60 * c, 30, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def run_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run `adaptive-vit ARGS...` in-process inside tmp_path (runs/ lands there)."""
    from adaptive_vit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["adaptive-vit"])

    def run(*args: str):
        return main(list(args))

    return run
