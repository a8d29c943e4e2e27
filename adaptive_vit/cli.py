"""The `adaptive-vit` command: LightningCLI with this tool's defaults and two extra subcommands.

    adaptive-vit fit --config configs/demo/static.yaml
    adaptive-vit test --config configs/demo/static.yaml --ckpt_path runs/.../best.ckpt
    adaptive-vit flops --config configs/dvt_deit.yaml --format json
    adaptive-vit benchmark --config configs/cfvit_deit.yaml --batch_sizes [1,64]

Models and data are chosen by class name in the config (`model.class_path: CFViTLitModule`);
`num_classes` is linked from the data to the model.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

# Imported so that configs can name every class by its short name.
import adaptive_vit.callbacks  # noqa: F401
import adaptive_vit.methods  # noqa: F401
from adaptive_vit.callbacks.predictions import PredictionWriter
from adaptive_vit.data import ImageDataModule
from adaptive_vit.methods.base import AdaptiveLitModule
from adaptive_vit.runtime import keep_freed_memory
from adaptive_vit.trainer import AdaptiveTrainer

TRAINER_DEFAULTS: dict[str, Any] = {
    # The robustness callback needs gradients at test time.
    "inference_mode": False,
    "default_root_dir": "runs",
    "logger": [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
         "init_args": {"save_dir": "runs", "name": "adaptive-vit"}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger",
         "init_args": {"save_dir": "runs", "name": "adaptive-vit"}},
    ],
    "callbacks": [
        {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
         "init_args": {"logging_interval": "epoch"}},
    ],
}


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` always holds the latest state: after every training epoch,
    and at the batch where a fit stopped (an exception, Ctrl+C or SIGTERM: a preempted cluster job,
    Lightning stops at the end of the current batch). `adaptive-vit fit --config X --ckpt_path last`
    continues from there.

    Lightning (2.6) writes `last.ckpt` only beside a top-k checkpoint, so an epoch that does not
    improve the monitored metric would leave it stale; on an exception it also writes a checkpoint
    named like the monitored ones (`best-NNN.ckpt` here), which would pass for a best model.
    ModelCheckpoint has no public way to write `last.ckpt` on demand: `_save_last` uses its own
    private methods for it, which keep its bookkeeping (the step last saved, the path kept in its
    state, the file it replaces) as when Lightning writes it.
    """

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # not saved at this step yet
            self._save_last(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not self._should_save_on_exception(trainer):
            return
        self._save_last(trainer)
        rank_zero_info(
            f"fit stopped by {type(exception).__name__} at step {trainer.global_step}: saved "
            f"{self.last_model_path}; continue with `adaptive-vit fit ... --ckpt_path last`."
        )

    def _save_last(self, trainer: Trainer) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AdaptiveViTCLI(LightningCLI):
    """LightningCLI with checkpointing on val/top1 (`last.ckpt` after every epoch and where a fit
    stopped),
    `--ckpt_path last` resuming the newest run of the config in its own folder, predictions written
    by `predict`, the run's config saved beside its logs, `num_classes` linked from the data, and
    `flops` / `benchmark` subcommands."""

    _resuming = False

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "flops": {"model", "datamodule"},
            "benchmark": {"model", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.set_defaults({
            "checkpoint.monitor": "val/top1",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.save_on_exception": True,
            "checkpoint.filename": "best-{epoch:03d}",
            "checkpoint.auto_insert_metric_name": False,
            **{f"trainer.{k}": v for k, v in TRAINER_DEFAULTS.items()},
        })
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Keep the config as the source of truth when `--ckpt_path` is given.

        LightningCLI (>= 2.3) would merge the checkpoint's hyper-parameters over the config, class
        included: `test --config cfvit.yaml --ckpt_path static.ckpt` would silently evaluate the
        static model, and `--model.init_args.thresholds`/`budget` given on the command line would be
        replaced by the checkpoint's. Here the configured model is built, and a checkpoint of
        another method is refused by `AdaptiveLitModule.on_load_checkpoint` with the fix.
        """

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit" and self.config.fit.get("ckpt_path") == "last":
            self._resume_last(self.config.fit)
        # `flops` and `benchmark` measure one model in one process: a config written for 8 GPUs
        # with DDP and AMP must still run them (on whatever device this machine has).
        if self.subcommand in ("flops", "benchmark"):
            trainer = self.config[self.subcommand].trainer
            for key, value in {"accelerator": "auto", "devices": 1, "num_nodes": 1,
                               "strategy": "auto", "precision": None, "logger": False}.items():
                trainer[key] = value

    def instantiate_classes(self) -> None:
        if self.subcommand == "flops":
            # Costs and parameter counts need shapes only: build on the meta device, which skips
            # allocating and initialising tens of millions of weights.
            with torch.device("meta"):
                super().instantiate_classes()
        else:
            super().instantiate_classes()
        _share_version_folder(self.trainer.loggers)
        if self._resuming:
            _keep_csv_metrics(self.trainer.loggers)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """`--trainer.enable_progress_bar false` drops the progress bars among the configured
        callbacks (the demo configs list a RichProgressBar), which Lightning would refuse."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        if config.get("enable_progress_bar") is False:
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            kwargs.setdefault("callbacks", [c for c in callbacks if not isinstance(c, ProgressBar)])
        return super().instantiate_trainer(**kwargs)

    def _resume_last(self, config: Any) -> None:
        """`fit --ckpt_path last`: continue the newest run of this config, in its folder.

        Lightning would look for `last` in the checkpoint folder of the new run it is starting
        (an empty `version_N+1`). Here it is the most recently written
        `<save_dir>/<name>/version_*/checkpoints/last.ckpt` of the config's first logger (or
        `checkpoint.dirpath`), and the loggers write on in that version folder: metrics.csv is
        appended to, TensorBoard adds an event file, and this run's config is saved as
        `config-resumed-N.yaml` beside the original `config.yaml`.
        """
        loggers = _logger_configs(config.trainer.logger)
        if config.checkpoint.get("dirpath"):
            pattern = Path(config.checkpoint.dirpath) / "last.ckpt"
            found = [pattern] if pattern.is_file() else []
        else:
            if loggers:
                root = Path(loggers[0].save_dir or ".") / (loggers[0].name or "")
            else:  # Lightning's default logger
                root = Path(config.trainer.default_root_dir or ".") / "lightning_logs"
            pattern = root / "version_*" / "checkpoints" / "last.ckpt"
            found = list(root.glob("version_*/checkpoints/last.ckpt"))
        if not found:
            raise FileNotFoundError(
                f"--ckpt_path last: no checkpoint to resume, looked for {pattern} (from this "
                "config's checkpoint.dirpath or first logger's save_dir/name). Start the run "
                "without --ckpt_path, or pass the "
                "checkpoint file: --ckpt_path runs/<name>/version_N/checkpoints/last.ckpt."
            )
        last = max(found, key=lambda path: path.stat().st_mtime)
        config.ckpt_path = str(last.resolve())
        run_dir = last.parent.parent
        for logger in loggers:
            if Path(logger.save_dir or ".") / (logger.name or "") == run_dir.parent and logger.version is None:
                logger.version = run_dir.name
        resumed = len(list(run_dir.glob("config-resumed-*.yaml"))) + 1
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config-resumed-{resumed}.yaml"}
        self._resuming = True
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        rank_zero_info(f"Resuming {last}, logging on in {run_dir}")

    def _check_weights(self, subcommand: str) -> None:
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path and not self.model.has_trained_weights():
            sys.exit(
                f"adaptive-vit {subcommand}: no weights to evaluate. Pass --ckpt_path "
                "(e.g. runs/<name>/version_0/checkpoints/last.ckpt, or `best`/`last` after a fit), "
                "or configure trained weights (model.init_args.init_from: FILE, or a backbone with "
                "pretrained: true | /path/to/weights). Refusing to evaluate random weights."
            )

    def before_test(self) -> None:
        self._check_weights("test")

    def before_validate(self) -> None:
        self._check_weights("validate")

    def before_predict(self) -> None:
        self._check_weights("predict")


def _share_version_folder(loggers: list[Any]) -> None:
    """Loggers with the same save_dir and name but no explicit version each pick the next free
    `version_N` on their own, and disagree once the first has made its folder: give them all the
    first one's version, so a run is one folder (config, checkpoints, events and metrics.csv)."""
    if len(loggers) < 2:
        return
    first = loggers[0]
    for logger in loggers[1:]:
        same_place = (logger.save_dir, logger.name) == (first.save_dir, first.name)
        if same_place and getattr(logger, "_version", 0) is None:
            logger._version = first.version  # CSVLogger/TensorBoardLogger have no setter
            # The CSV logger then warns that the (shared) folder is not empty; it only writes its
            # own metrics.csv there, which is new in a new version folder.
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


def _logger_configs(logger: Any) -> list[Any]:
    """The `init_args` of the configured loggers that have a save_dir (none for `logger: false`
    or Lightning's default)."""
    configs = logger if isinstance(logger, list) else [logger]
    return [c.init_args for c in configs
            if hasattr(c, "init_args") and getattr(c.init_args, "save_dir", None) is not None]


def _keep_csv_metrics(loggers: list[Any]) -> None:
    """A CSVLogger deletes the metrics.csv it finds in its folder when it starts: on resuming,
    put the interrupted run's rows back and append after them."""
    if rank_zero_only.rank != 0:  # only rank 0 writes (and deletes) it
        return
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        rows = path.read_text()
        experiment = logger.experiment  # created here: removes metrics.csv
        path.write_text(rows)
        experiment.metrics_keys = rows.splitlines()[0].split(",") if rows else []


def main(args: list[str] | None = None) -> AdaptiveViTCLI | None:
    """Entry point of `adaptive-vit` (also `python -m adaptive_vit`).

    Called with `args` (tests, scripts), it returns the CLI (trainer, model, datamodule) and lets
    errors propagate. On the command line it returns None (the console script passes the result
    to sys.exit), and a configuration mistake (a missing file, a bad value, a checkpoint that does
    not fit) ends with its message and exit status 2 rather than a traceback; set
    ADAPTIVE_VIT_DEBUG=1 for the traceback. A fit stopped by SIGTERM exits with status 143
    (128 + SIGTERM, as if killed: Lightning's own exit would report success to the scheduler).
    """
    if args is not None:
        return _run(args)
    try:
        _run(None)
    except SIGTERMException:
        print("adaptive-vit: stopped by SIGTERM; continue with the same command and "
              "--ckpt_path last", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("ADAPTIVE_VIT_DEBUG"):
            raise
        print(f"adaptive-vit: error: {_own_message(err)}", file=sys.stderr)
        sys.exit(2)
    return None


def _own_message(err: BaseException) -> str:
    """The message an instantiation error carries, without jsonargparse's Union wrapping."""
    text = str(err)
    if not text.startswith("Does not validate against any of the Union subtypes"):
        return text
    reasons = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
    reasons = [r for r in reasons if not r.startswith("Expected a <class 'NoneType'>")]
    return "\n".join(reasons) or text


def _run(args: list[str] | None) -> AdaptiveViTCLI:
    keep_freed_memory()  # CPU work reuses freed tensor memory instead of page-faulting it afresh
    return AdaptiveViTCLI(
        model_class=AdaptiveLitModule,
        datamodule_class=ImageDataModule,
        trainer_class=AdaptiveTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
    )
