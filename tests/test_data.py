"""Tests for :mod:`adaptive_vit.data` on generated class folders and the bundled demo digits."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from PIL import Image

from adaptive_vit import data
from adaptive_vit.data import DATASETS, ImageDataModule, UnreadableImageWarning
from adaptive_vit.data.cifar import Cifar10Source

CLASSES = ("cat", "dog", "fox")
IMG = 16


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """Write ``count`` small random RGB PNGs of varying shape into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(20 + i % 3, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i}.png")


def make_tree(root: Path, splits: tuple[str, ...] = ("train", "val"), per_class: int = 6) -> Path:
    """A class-folder tree ``root/<split>/<class>/img_<i>.png``."""
    for split in splits:
        for label, name in enumerate(CLASSES):
            make_images(root / split / name, per_class, seed=label)
    return root


def split_dataset(dm: ImageDataModule, split: str):
    """The dataset behind ``dm``'s loader for ``split`` (train, val or test)."""
    return getattr(dm, f"{split}_dataloader")().dataset


def folder_dm(root: Path, **kwargs) -> ImageDataModule:
    options = dict(dataset="folder", root=str(root), img_size=IMG, batch_size=4, num_workers=0)
    return ImageDataModule(**(options | kwargs))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data")


@pytest.fixture(scope="module")
def demo() -> ImageDataModule:
    dm = ImageDataModule(img_size=32, batch_size=8, num_workers=0)
    dm.setup()
    return dm


# ---------------------------------------------------------------- class folders


def test_folder_batches_and_metadata(tree: Path) -> None:
    dm = folder_dm(tree)
    assert dm.num_classes == 3  # before setup
    assert dm.class_names == list(CLASSES)
    assert dm.in_chans == 3 and len(dm.mean) == 3 and len(dm.std) == 3
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, IMG, IMG) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}
    val_images, _ = next(iter(dm.val_dataloader()))
    assert val_images.shape == (4, 3, IMG, IMG)
    assert sorted(dm.val_dataloader().dataset.targets) == [0] * 6 + [1] * 6 + [2] * 6


def test_folder_test_split_falls_back_to_val(tree: Path) -> None:
    dm = folder_dm(tree)
    dm.setup("test")
    assert Path(dm.test_dataloader().dataset.root) == tree / "val"
    for name in CLASSES:
        make_images(tree / "test" / name, 2)
    dm = folder_dm(tree)
    dm.setup("predict")
    assert Path(dm.predict_dataloader().dataset.root) == tree / "test"


def test_fewer_eval_images_than_processes_is_refused_on_every_rank(tree: Path) -> None:
    dm = folder_dm(tree)
    dm.setup("validate")
    images = len(split_dataset(dm, "val"))
    dm.trainer = SimpleNamespace(world_size=images, global_rank=images - 1)
    assert len(list(dm.val_dataloader().sampler)) == 1  # one image each: fine
    for rank in (0, images):
        dm.trainer = SimpleNamespace(world_size=images + 1, global_rank=rank)
        with pytest.raises(ValueError, match=rf"'val' split has {images} image\(s\) for {images + 1} processes.*"
                                             rf"fewer devices .*<= {images}\) or evaluate on more images"):
            dm.val_dataloader()


def test_hidden_folders_are_not_classes(tree: Path) -> None:
    (tree / "train" / ".ipynb_checkpoints").mkdir()
    assert folder_dm(tree).num_classes == 3


def test_corrupt_image_is_reported_and_skipped(tree: Path) -> None:
    bad = tree / "train" / "dog" / "img_0.png"
    bad.write_bytes(b"definitely not a png")
    dm = folder_dm(tree, auto_augment=None, reprob=0.0)
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    index = [path for path, _ in dataset.samples].index(str(bad))
    with pytest.warns(UnreadableImageWarning, match="training takes the next readable image in place"), \
            pytest.warns(UnreadableImageWarning, match=re.escape(str(bad))):
        image, label = dataset[index]
    assert image.shape == (3, IMG, IMG) and label == CLASSES.index("dog")
    with warnings.catch_warnings(record=True) as reported:  # once per file, not per read
        warnings.simplefilter("always")
        dataset[index]
        batches = list(dm.train_dataloader())
    assert not [w for w in reported if issubclass(w.category, UnreadableImageWarning)]
    assert sum(len(labels) for _, labels in batches) == 18


def unreadable_test_split(root: Path) -> Path:
    """A tree whose test split has 7 readable images and 5 empty files, in batches of 4:
    [3 digit_0 + zero_bytes.png], [4 unreadable digit_1], [4 digit_1]."""
    for split in ("train", "val", "test"):
        for digit in (0, 1):
            make_images(root / split / f"digit_{digit}", 3 + digit, seed=digit)
    (root / "test/digit_0/zero_bytes.png").write_bytes(b"")
    for i in range(4):
        (root / f"test/digit_1/bad_{i}.png").write_bytes(b"")
    return root


class _RecordLabels(LightningModule):
    """Keeps the labels of every test batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[int]] = []

    def test_step(self, batch, batch_idx):
        self.batches.append(batch[1].tolist())


def test_evaluation_leaves_unreadable_images_out(tmp_path: Path) -> None:
    """An unreadable test image is skipped, with its path in a warning, and never replaced by the
    next sample (which may be of the next class); a batch of nothing but unreadable images is not
    given to the step."""
    root = unreadable_test_split(tmp_path)
    model = _RecordLabels()
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UnreadableImageWarning) as reported:
        trainer.test(model, datamodule=folder_dm(root))
    assert model.batches == [[0, 0, 0], [1, 1, 1, 1]]
    assert any(str(root / "test/digit_0/zero_bytes.png") in str(w.message) for w in reported)


def test_each_ddp_rank_counts_only_the_images_it_read(tmp_path: Path) -> None:
    dm = folder_dm(unreadable_test_split(tmp_path))
    dm.setup("test")
    labels = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        for rank in (0, 1):
            dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
            labels += [label for _, batch in dm.test_dataloader() for label in batch.tolist()]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 1]


# ---------------------------------------------------------------- demo digits


def test_demo_split_sizes_stratified_disjoint(demo: ImageDataModule) -> None:
    per_class = {"train": 400, "val": 50, "test": 50}
    indices = {}
    for split in per_class:
        subset = split_dataset(demo, split)
        labels = np.asarray(subset.dataset.targets)[subset.indices]
        assert np.bincount(labels, minlength=10).tolist() == [per_class[split]] * 10
        indices[split] = set(subset.indices)
    assert len(indices["train"] | indices["val"] | indices["test"]) == 5000  # disjoint and complete
    assert demo.num_classes == 10 and demo.class_names == [str(d) for d in range(10)]


def test_demo_split_ignores_seeds(demo: ImageDataModule) -> None:
    torch.manual_seed(123)
    np.random.seed(123)
    other = ImageDataModule(img_size=32, num_workers=0, seed=7)
    other.setup()
    for split in ("train", "val", "test"):
        mine = split_dataset(demo, split).indices
        theirs = split_dataset(other, split).indices
        assert mine == theirs


def test_demo_images_are_normalised_32px(demo: ImageDataModule) -> None:
    images = torch.stack([demo.val_dataloader().dataset[i][0] for i in range(500)])
    assert images.shape == (500, 3, 32, 32)
    assert abs(images.mean().item()) < 0.1 and abs(images.std().item() - 1) < 0.1
    train_images, _ = next(iter(demo.train_dataloader()))
    assert train_images.shape == (8, 3, 32, 32)


# ---------------------------------------------------------------- cifar splits


class FakeCIFAR10(torch.utils.data.Dataset):
    """In-memory stand-in for torchvision's CIFAR10: 100 train / 30 test images, 10 classes."""

    base_folder = "cifar-10-batches-py"

    def __init__(self, root: str, train: bool = True, transform=None, download: bool = False):
        count = 100 if train else 30
        rng = np.random.default_rng(int(train))
        self.data = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(count)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


@pytest.fixture
def fake_cifar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Cifar10Source, "dataset_class", FakeCIFAR10)


@pytest.mark.usefixtures("fake_cifar")
def test_cifar_uses_test_set_for_val_by_default(tmp_path: Path) -> None:
    dm = ImageDataModule(dataset="cifar10", root=str(tmp_path), img_size=32, num_workers=0)
    dm.setup()
    sizes = [len(split_dataset(dm, split)) for split in ("train", "val", "test")]
    assert sizes == [100, 30, 30]


@pytest.mark.usefixtures("fake_cifar")
def test_cifar_val_split_holds_out_train_images(tmp_path: Path) -> None:
    dm = ImageDataModule(
        dataset="cifar10", root=str(tmp_path), img_size=32, num_workers=0, val_split=0.2, seed=3
    )
    dm.setup()
    train, val = dm.train_dataloader().dataset, dm.val_dataloader().dataset
    assert len(train) == 80 and len(val) == 20 and not set(train.indices) & set(val.indices)
    assert sorted(val.dataset.targets[i] for i in val.indices) == sorted(list(range(10)) * 2)
    assert val.dataset.transform is dm.eval_transform
    assert len(dm.test_dataloader().dataset) == 30


def test_rand_augment_posterize_to_zero_bits_gives_black_not_an_error() -> None:
    """timm's RandAugment posterizes to 0 bits at magnitude 10 (reached by `mstd` noise from the
    default m9 about once in 700 training images): Pillow 13 refuses 0 bits with a ValueError,
    which ended the run. Pillow < 13 gave a black image."""
    dm = ImageDataModule(img_size=32, num_workers=0, auto_augment="rand-m10-p1.0-inc1")
    (rand_augment,) = [step for step in dm.train_transform.transforms if hasattr(step, "ops")]
    (posterize,) = [op for op in rand_augment.ops if op.name == "PosterizeIncreasing"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert np.asarray(posterize(image)).max() == 0


# ---------------------------------------------------------------- soft targets


def batch_through_hook(dm: ImageDataModule, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dm.trainer = SimpleNamespace(training=training)
    return dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)


def test_mixup_gives_soft_targets_in_training_only() -> None:
    dm = ImageDataModule(
        img_size=32, batch_size=8, num_workers=0, mixup=0.8, cutmix=1.0, label_smoothing=0.1
    )
    dm.setup("fit")
    assert dm.soft_targets
    images, targets = batch_through_hook(dm, training=True)
    assert images.shape == (8, 3, 32, 32) and targets.shape == (8, 10)
    assert torch.allclose(targets.sum(dim=1), torch.ones(8))
    assert (targets > 0).sum(dim=1).min() > 1  # smoothed, hence never one-hot
    _, labels = batch_through_hook(dm, training=False)
    assert labels.dtype == torch.int64 and labels.shape == (8,)


def test_label_smoothing_alone_gives_soft_targets() -> None:
    dm = ImageDataModule(img_size=32, batch_size=8, num_workers=0, label_smoothing=0.1)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(training=True)
    images, labels = next(iter(dm.train_dataloader()))
    _, targets = dm.on_after_batch_transfer((images, labels), 0)
    expected = torch.full((8, 10), 0.01).scatter_(1, labels[:, None], 0.91)
    assert torch.allclose(targets, expected)


def test_no_soft_targets_by_default(demo: ImageDataModule) -> None:
    assert not demo.soft_targets
    _, labels = batch_through_hook(demo, training=True)
    assert labels.dtype == torch.int64


class _RecordTargets(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3 * 32 * 32, 10)
        self.seen: dict[str, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        images, targets = batch
        self.seen["train"] = targets
        return torch.nn.functional.cross_entropy(self.head(images.flatten(1)), targets)

    def validation_step(self, batch, batch_idx):
        self.seen["val"] = batch[1]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_sees_soft_train_and_integer_val_targets() -> None:
    dm = ImageDataModule(img_size=32, batch_size=8, num_workers=0, mixup=0.2)
    model = _RecordTargets()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert model.seen["train"].shape == (8, 10) and model.seen["train"].is_floating_point()
    assert model.seen["val"].dtype == torch.int64


# ---------------------------------------------------------------- errors


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'") as error:
        ImageDataModule(dataset="mnist")
    assert all(name in str(error.value) for name in DATASETS)


def test_root_required() -> None:
    with pytest.raises(ValueError, match="needs `root`"):
        ImageDataModule(dataset="imagenet")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(img_size=0), "img_size"),
        (dict(batch_size=7, mixup=0.8), "even batch_size"),
        (dict(val_split=1.0), "val_split"),
        (dict(mean=(0.5, 0.5)), "3 values"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageDataModule(**options)


def test_missing_root_names_path(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(root))) as error:
        folder_dm(root)
    assert "train/<class>/<image>.jpg" in str(error.value)


def test_missing_val_folder(tmp_path: Path) -> None:
    dm = folder_dm(make_tree(tmp_path, splits=("train",)))
    message = f"missing split folder {tmp_path / 'val'}"
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        dm.setup("fit")


def test_imagenet_checks_class_count(tree: Path) -> None:
    dm = ImageDataModule(dataset="imagenet", root=str(tree), num_workers=0)
    assert dm.num_classes == 1000
    with pytest.raises(ValueError, match="expects 1000 class folders"):
        dm.setup("fit")


def test_split_without_images(tree: Path) -> None:
    for name in CLASSES:
        for image in (tree / "val" / name).iterdir():
            image.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"no images found in {tree / 'val'}")):
        folder_dm(tree).setup("validate")


def test_empty_class_folder_is_named(tree: Path) -> None:
    for image in (tree / "train" / "dog").iterdir():
        image.unlink()
    message = f"empty class folders (no images with a supported extension): {tree / 'train/dog'}"
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        folder_dm(tree).setup("fit")


def test_class_folders_must_match_across_splits(tree: Path) -> None:
    (tree / "val" / "fox").rename(tree / "val" / "wolf")
    with pytest.raises(FileNotFoundError, match=r"missing \[fox\], unexpected \[wolf\]"):
        folder_dm(tree).setup("validate")


def test_cifar_missing_without_download(tmp_path: Path) -> None:
    dm = ImageDataModule(dataset="cifar10", root=str(tmp_path), num_workers=0)
    assert dm.num_classes == 10
    folder = re.escape(str(tmp_path / "cifar-10-batches-py"))
    with pytest.raises(FileNotFoundError, match=folder) as error:
        dm.setup("fit")
    assert "download: true" in str(error.value)


def test_folder_val_split_holds_out_part_of_train(tmp_path) -> None:
    """val_split carves a stratified validation split out of train/; val/ becomes the test split."""
    from conftest import make_image_folder

    root = make_image_folder(tmp_path / "images", classes=3, per_class=8)
    data = ImageDataModule(dataset="folder", root=str(root), img_size=32, batch_size=4,
                           num_workers=0, val_split=0.25, auto_augment=None)
    data.setup("fit")
    data.setup("test")
    train, val, test = (data._datasets[s] for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (18, 6, 24)
    train_files = {train.dataset.samples[i][0] for i in train.indices}
    val_files = {val.dataset.samples[i][0] for i in val.indices}
    assert not train_files & val_files and all("/train/" in f for f in val_files)
    assert sorted(val.dataset.targets[i] for i in val.indices) == [0, 0, 1, 1, 2, 2]
    assert all("/val/" in path for path, _ in test.samples)


# ---------------------------------------------------------------- image files


def eval_sample(dm: ImageDataModule, path: Path) -> tuple[torch.Tensor, int] | None:
    """The validation sample of the image file ``path`` (``None`` if unreadable)."""
    dm.setup("validate")
    dataset = split_dataset(dm, "val")
    return dataset[[p for p, _ in dataset.samples].index(str(path))]


def test_16_bit_png_is_scaled_not_saturated(tree: Path) -> None:
    """A 16-bit grayscale PNG (mode I;16) keeps its contrast: 65535 maps to 255, not every value
    above 255."""
    values = np.linspace(0, 50_000, IMG * IMG).reshape(IMG, IMG).astype(np.uint16)
    path = tree / "val" / "cat" / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    image, _ = eval_sample(folder_dm(tree, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1)), path)
    assert image.shape == (3, IMG, IMG)
    assert abs(image.mean().item() * 255 - values.mean() / 257) < 1  # about 97, not 255


def test_image_mode_without_a_known_range_is_named(tree: Path) -> None:
    """A float image has no known value range: it is reported as unreadable, with its mode."""
    path = tree / "val" / "cat" / "float.tif"
    Image.fromarray(np.full((IMG, IMG), 0.5, dtype=np.float32)).save(path)
    with pytest.warns(UnreadableImageWarning, match=re.escape(str(path)) + ".*mode F"):
        assert eval_sample(folder_dm(tree), path) is None


def test_files_not_taken_are_counted_with_reasons(tree: Path) -> None:
    """Every extension Pillow opens is an image (a .gif too); the other files of a split are
    counted in one warning, with examples, instead of vanishing."""
    cat = tree / "train" / "cat"
    Image.new("P", (20, 24), 3).save(cat / "anim.gif")
    Image.new("RGB", (20, 24)).save(cat / "scan", format="PNG")  # an image without an extension
    (cat / "notes.txt").write_text("not an image")
    with warnings.catch_warnings(record=True) as reported:
        warnings.simplefilter("always")
        dm = folder_dm(tree)
        dm.setup("fit")
    taken = [Path(path).name for path, _ in split_dataset(dm, "train").samples]
    assert "anim.gif" in taken and len(taken) == 3 * 6 + 1
    (warning,) = [w for w in reported if "not taken" in str(w.message)]
    message = str(warning.message)
    assert warning.category is data.SkippedFilesWarning
    assert message.startswith(f"{tree / 'train'}: 2 file(s) not taken as images")
    assert "1 without an extension (cat/scan)" in message and "1 '.txt' (cat/notes.txt)" in message
