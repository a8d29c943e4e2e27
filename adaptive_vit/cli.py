"""The `adaptive-vit` command: LightningCLI with this tool's defaults and two extra subcommands.

    adaptive-vit fit --config configs/demo/static.yaml
    adaptive-vit test --config configs/demo/static.yaml --ckpt_path best
    adaptive-vit flops --config configs/dvt_deit.yaml --format json
    adaptive-vit benchmark --config configs/cfvit_deit.yaml --batch_sizes [1,64]

Models and data are chosen by class name in the config (`model.class_path: CFViTLitModule`);
`num_classes` is linked from the data to the model. Every run gets its own folder
(`<save_dir>/<name>/version_N`, with or without loggers): its config, checkpoints (`last.ckpt` after
every epoch, `best-NNN.ckpt`), logs and, for `predict`, `predictions.csv`. `--ckpt_path last` /
`best` name a checkpoint of the config's newest run. Checkpoints are loaded as untrusted files
(`adaptive_vit.checkpoints.load_checkpoint_file`), and a mistake on the command line or in a config
ends in one message naming the fix (`_configuration_message`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import re
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentError, ArgumentParser
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning_utilities.core import rank_zero

# Imported so that configs can name every class by its short name.
import adaptive_vit.callbacks  # noqa: F401
import adaptive_vit.methods  # noqa: F401
from adaptive_vit.backbones.spec import check_backbone_spelling
from adaptive_vit.callbacks.predictions import PredictionWriter
from adaptive_vit.checkpoints import load_checkpoint_file
from adaptive_vit.data import ImageDataModule
from adaptive_vit.methods.base import AdaptiveLitModule
from adaptive_vit.runtime import keep_freed_memory
from adaptive_vit.trainer import AdaptiveTrainer, print_table

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

# The subcommands that run the Trainer on data, each in a run folder of its own.
RUNS = ("fit", "validate", "test", "predict")


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

    Evaluating a checkpoint (`test`, `validate`, `predict`) does not take over its record of an earlier
    fit's checkpoint folder: there is nothing to save, and Lightning would warn that the folder changed.
    """

    _fitting = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._fitting = stage == "fit"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._fitting:
            super().load_state_dict(state_dict)

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


class CostSummary(ModelSummary):
    """Lightning's model summary with this tool's GFLOPs per image in place of Lightning's FLOPs.

    Lightning's FLOPs column counts a forward of the module's `example_input_array` with torch's
    counter (two per multiply-add), and reads 0 for every module without one; this tool counts
    multiply-adds (fvcore, as the papers do), per exit of the adaptive network.
    """

    _module: AdaptiveLitModule | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._module = pl_module
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data: list[tuple[str, list[str]]], total_parameters: int,
                  trainable_parameters: int, model_size: float, total_training_modes: dict[str, int],
                  total_flops: int, **summarize_kwargs: Any) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        print_table(type(self._module).__name__, [name for name, _ in columns],
                    list(zip(*(values for _, values in columns))))
        net = self._module.net
        cost = ", ".join(f"{name} {gflops:.4g}" for name, gflops in zip(net.exit_names, net.exit_gflops()))
        print(f"Parameters: {get_human_readable_count(total_parameters)} "
              f"({get_human_readable_count(trainable_parameters)} trainable), {model_size:.3f} MB\n"
              f"GFLOPs per image{' at each exit (cumulative)' if net.num_exits > 1 else ''}: {cost}")


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, loading every `--ckpt_path` through `load_checkpoint_file`
    (`weights_only=True` with this tool's allowlist, whatever `--weights_only` says; one message
    for every way a file can be wrong). A checkpoint the CLI loaded before the run (to stop before
    anything is written) is handed over here instead of being read twice."""

    def __init__(self) -> None:
        super().__init__()
        self._loaded: dict[str, dict[str, Any]] = {}

    def hand_over(self, path: str, checkpoint: dict[str, Any]) -> None:
        self._loaded[path] = checkpoint

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return self._loaded.pop(str(path), None) or load_checkpoint_file(str(path), what="--ckpt_path")


class AdaptiveViTCLI(LightningCLI):
    """LightningCLI with checkpointing on val/top1 (`last.ckpt` after every epoch and where a fit
    stopped), a folder per run with or without loggers, `--ckpt_path last|best` naming the config's
    newest run, predictions written by `predict`, the run's config saved beside its logs,
    `num_classes` linked from the data, and `flops` / `benchmark` subcommands."""

    _resuming = False
    _checkpoint_step: int | None = None  # the global step of --ckpt_path
    _run_dir: Path | None = None  # the run folder, where this tool (not a logger) chooses it

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

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str] | None) -> None:
        """Parse, turning jsonargparse's error (a usage block and nested Union reports) into one
        message naming the mistake and its fix (`_configuration_message`). `main(args)` is how
        scripts run this tool whatever their own command line, hence no warning about `args`
        next to `sys.argv` (LightningCLI's)."""
        argv = sys.argv[1:] if args is None else list(args)
        _check_config_spelling(argv)
        try:
            self.config = parser.parse_args(args)
        except ArgumentError as err:
            subcommand = next((arg for arg in argv if arg in self.subcommands()), None)
            raise ValueError(_configuration_message(err, argv, subcommand, self._known_keys(subcommand))) from err

    def _known_keys(self, subcommand: str | None) -> list[str]:
        """Every option of a subcommand (`trainer.max_epochs`, `checkpoint.monitor`, `ckpt_path`...)."""
        # LightningCLI keeps its subcommands' parsers there, with no public accessor.
        parser = self._subcommand_parsers.get(subcommand) if subcommand else None
        return list(parser.get_defaults(skip_validation=True).keys()) if parser else []

    def _parse_ckpt_path(self) -> None:
        """Keep the config as the source of truth when `--ckpt_path` is given.

        LightningCLI (>= 2.3) would merge the checkpoint's hyper-parameters over the config, class
        included: `test --config cfvit.yaml --ckpt_path static.ckpt` would silently evaluate the
        static model, and `--model.init_args.thresholds`/`budget` given on the command line would be
        replaced by the checkpoint's. Here the configured model is built, and a checkpoint of
        another method is refused by `AdaptiveLitModule.on_load_checkpoint` with the fix.
        """

    def before_instantiate_classes(self) -> None:
        if self.subcommand in RUNS:
            config = self.config[self.subcommand]
            self._resolve_ckpt_path(config)
            if self._run_dir is None and _without_logger(config.trainer.logger):
                root = _runs_root(config)
                self._run_dir = root / f"version_{_next_version(root)}"
        # `flops` and `benchmark` measure one model in one process: a config written for 8 GPUs
        # with DDP and AMP must still run them (on whatever device this machine has).
        if self.subcommand in ("flops", "benchmark"):
            trainer = self.config[self.subcommand].trainer
            for key, value in {"accelerator": "auto", "devices": 1, "num_nodes": 1,
                               "strategy": "auto", "precision": None, "logger": False}.items():
                trainer[key] = value

    def _resolve_ckpt_path(self, config: Any) -> None:
        """`--ckpt_path last` / `best`: a checkpoint of the config's newest run (Lightning would look
        in the folder of the run it is starting). `fit --ckpt_path last` continues that run in its
        folder; `test`, `validate` and `predict` evaluate its last or best checkpoint."""
        wanted = config.get("ckpt_path")
        if wanted not in ("last", "best") or self.subcommand == "fit" and wanted == "best":
            return
        found, pattern = _last_checkpoints(config)
        if not found:
            looked = f"no checkpoint of this config, looked for {pattern}"
            if self.subcommand != "fit":
                raise ValueError(_no_weights_message(self.subcommand, f" (--ckpt_path {wanted}: {looked})"))
            raise FileNotFoundError(
                f"--ckpt_path last: no checkpoint to resume, looked for {pattern} (from this config's "
                "checkpoint.dirpath or first logger's save_dir/name). Start the run without --ckpt_path, "
                "or pass the checkpoint file: --ckpt_path runs/<name>/version_N/checkpoints/last.ckpt."
            )
        last = max(found, key=lambda path: path.stat().st_mtime)
        if self.subcommand == "fit":
            self._resume(config, last)
        else:
            config.ckpt_path = str((last if wanted == "last" else _best_checkpoint(last)).resolve())

    def _resume(self, config: Any, last: Path) -> None:
        """Continue the run of `last` in its folder: the loggers write on there (metrics.csv is
        appended to, TensorBoard adds an event file), and this run's config is saved as
        `config-resumed-N.yaml` beside the original `config.yaml`."""
        config.ckpt_path = str(last.resolve())
        self._run_dir = last.parent.parent
        resumed = len(list(self._run_dir.glob("config-resumed-*.yaml"))) + 1
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config-resumed-{resumed}.yaml"}
        self._resuming = True
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        rank_zero_info(f"Resuming {last}, logging on in {self._run_dir}")

    def instantiate_classes(self) -> None:
        if self.subcommand == "flops":
            # Costs and parameter counts need shapes only: build on the meta device, which skips
            # allocating and initialising tens of millions of weights.
            with torch.device("meta"):
                super().instantiate_classes()
            return
        super().instantiate_classes()
        if self.subcommand in RUNS:
            _log_in_one_folder(self.trainer.loggers, self._run_dir)
            if self._resuming:
                _keep_csv_metrics(self.trainer.loggers)
            self._load_checkpoint_first()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured Trainer, less the callbacks the configuration rules out (progress bars with
        `enable_progress_bar: false`, which Lightning would refuse; a LearningRateMonitor without a
        logger, which it needs), with this tool's model summary, and in its run folder when no
        logger chooses one."""
        config = self.config_init[self.subcommand].trainer
        callbacks = [c for c in _as_list(config.get("callbacks")) if not _ruled_out(c, config)]
        if config.get("enable_model_summary") is not False and not config.get("barebones"):
            if not any(isinstance(c, ModelSummary) for c in callbacks):
                callbacks.append(CostSummary())
            kwargs["enable_model_summary"] = False  # Lightning's own: it would also announce ours
        kwargs.setdefault("callbacks", callbacks)
        if self._run_dir is not None and _without_logger(config.get("logger")):
            kwargs.setdefault("default_root_dir", str(self._run_dir))
        return super().instantiate_trainer(**kwargs)

    def _load_checkpoint_first(self) -> None:
        """Load `--ckpt_path` before the run starts, so that a file that cannot be loaded stops the
        command before anything is written, and hand it to Lightning (`SafeCheckpointIO`)."""
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # not a plugin the config chose
            strategy.checkpoint_io = SafeCheckpointIO()
        path = self.config[self.subcommand].get("ckpt_path")
        if not path:
            return
        checkpoint = load_checkpoint_file(path, what="--ckpt_path")
        self._checkpoint_step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
        if isinstance(strategy.checkpoint_io, SafeCheckpointIO):
            strategy.checkpoint_io.hand_over(path, checkpoint)

    def _run_subcommand(self, subcommand: str) -> None:
        # LightningCLI has no public hook around a subcommand's run (`after_<subcommand>` is not
        # called when it fails): a command that fails before writing any result leaves no run folder.
        log_dir = self.trainer.log_dir if subcommand in RUNS else None
        created = _outermost_missing(Path(log_dir)) if log_dir else None
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if created is not None and self.trainer.is_global_zero and not _holds_results(created):
                shutil.rmtree(created, ignore_errors=True)
            raise

    def after_fit(self) -> None:
        if self._resuming and self.trainer.global_step == self._checkpoint_step:
            rank_zero_info(
                f"adaptive-vit fit: nothing left to train: {self.config.fit.ckpt_path} is the end of a finished "
                f"run (trainer.max_epochs {self.trainer.max_epochs}). To train on, raise --trainer.max_epochs "
                "(or --trainer.max_steps)."
            )

    def _check_weights(self, subcommand: str) -> None:
        if not self.config[subcommand].get("ckpt_path") and not self.model.has_trained_weights():
            raise ValueError(_no_weights_message(subcommand))

    def before_test(self) -> None:
        self._check_weights("test")

    def before_validate(self) -> None:
        self._check_weights("validate")

    def before_predict(self) -> None:
        self._check_weights("predict")


def _no_weights_message(subcommand: str, detail: str = "") -> str:
    """The no-weights error of `test`, `validate` and `predict`; `detail` says what was looked for."""
    return (
        f"{subcommand}: no weights to evaluate{detail}. Pass --ckpt_path (a file, e.g. "
        "runs/<name>/version_N/checkpoints/last.ckpt, or `last` / `best`: the newest run of this config), "
        "or configure trained weights (model.init_args.init_from: FILE, or a backbone with "
        "pretrained: true | /path/to/weights). Refusing to evaluate random weights."
    )


# ---------------------------------------------------------------------------- run folders


def _without_logger(logger: Any) -> bool:
    """`trainer.logger: false` (or an empty list); None and true are Lightning's default logger."""
    return logger is False or isinstance(logger, list) and not logger


def _logger_configs(logger: Any) -> list[Any]:
    """The `init_args` of the configured loggers that have a save_dir."""
    configs = logger if isinstance(logger, list) else [logger]
    return [c.init_args for c in configs
            if hasattr(c, "init_args") and getattr(c.init_args, "save_dir", None) is not None]


def _runs_root(config: Any) -> Path:
    """The folder of this config's run folders (`version_N`): its first logger's `save_dir/name`,
    `<default_root_dir>/lightning_logs` for Lightning's default logger, and without a logger
    `<default_root_dir>/<model class>`."""
    loggers = _logger_configs(config.trainer.logger)
    if loggers:
        return Path(loggers[0].save_dir or ".") / (loggers[0].name or "")
    root = Path(config.trainer.default_root_dir or ".")
    if _without_logger(config.trainer.logger):
        return root / config.model.class_path.rsplit(".", 1)[-1]
    return root / "lightning_logs"


def _next_version(root: Path) -> int:
    """The first free `version_N` in `root`, as Lightning's loggers number theirs."""
    versions = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    return max(versions, default=-1) + 1


def _last_checkpoints(config: Any) -> tuple[list[Path], Path]:
    """The `last.ckpt` of each of the config's runs (`<runs root>/version_*/checkpoints/last.ckpt`,
    see `_runs_root`, or `checkpoint.dirpath/last.ckpt`), and where they were looked for."""
    if config.checkpoint.get("dirpath"):
        pattern = Path(config.checkpoint.dirpath) / "last.ckpt"
        return [pattern] if pattern.is_file() else [], pattern
    root = _runs_root(config)
    return list(root.glob("version_*/checkpoints/last.ckpt")), root / "version_*" / "checkpoints" / "last.ckpt"


def _best_checkpoint(last: Path) -> Path:
    """The best checkpoint of `last`'s run, as its checkpoint callback recorded it."""
    checkpoint = load_checkpoint_file(str(last), what="--ckpt_path best")
    states = checkpoint.get("callbacks", {}) if isinstance(checkpoint, dict) else {}
    recorded = [state.get("best_model_path") for key, state in states.items()
                if key.startswith(ResumableCheckpoint.__qualname__) and state.get("best_model_path")]
    best = last.parent / Path(recorded[0]).name if recorded else None
    if best is None or not best.is_file():
        raise FileNotFoundError(
            f"--ckpt_path best: the run of {last} has no best checkpoint"
            + (f" ({best} is missing)" if best else "") + ". Pass --ckpt_path last or a checkpoint file."
        )
    return best


def _log_in_one_folder(loggers: list[Logger], run_dir: Path | None) -> None:
    """Loggers with the same save_dir and name but no explicit version each pick the next free
    `version_N` on their own, and disagree once the first has made its folder: they all take the
    first one's version, or the folder of the run being resumed, so that a run is one folder
    (config, checkpoints, events and metrics.csv)."""
    if not loggers:
        return
    place = _place(loggers[0])
    resumed = run_dir is not None and place == run_dir.parent
    version = run_dir.name if resumed else loggers[0].version
    for logger in loggers:
        # TensorBoardLogger and CSVLogger take a version in their constructor only. Given in the
        # config, it would be saved in the run's config.yaml, and running that again would write
        # into this run's folder.
        unset = getattr(logger, "_version", 0) is None
        if _place(logger) == place and (resumed or unset):
            logger._version = version
    # A CSV logger then warns that the (shared or resumed) folder is not empty; it only writes
    # its own metrics.csv there (kept by `_keep_csv_metrics` on resuming).
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


def _place(logger: Logger) -> Path:
    """The folder of a logger's version folders."""
    return Path(logger.save_dir or ".") / (logger.name or "")


def _keep_csv_metrics(loggers: list[Logger]) -> None:
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


def _outermost_missing(folder: Path) -> Path | None:
    """The outermost of `folder` and its parents that does not exist yet (None: `folder` exists)."""
    if folder.exists():
        return None
    while not folder.parent.exists():
        folder = folder.parent
    return folder


def _holds_results(folder: Path) -> bool:
    """Whether a folder holds anything a run produced: a checkpoint or a CSV of figures."""
    return any(folder.rglob("*.ckpt")) or any(folder.rglob("*.csv"))


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _ruled_out(callback: Any, trainer_config: Any) -> bool:
    """A configured callback that cannot work with the rest of the configuration."""
    if isinstance(callback, ProgressBar):
        return trainer_config.get("enable_progress_bar") is False
    return isinstance(callback, LearningRateMonitor) and _without_logger(trainer_config.get("logger"))


# ---------------------------------------------------------------------------- configuration errors


def _configuration_message(err: ArgumentError, argv: list[str], subcommand: str | None,
                          known_keys: list[str] | None = None) -> str:
    """One message for what jsonargparse could not parse: the option, the mistake and the fix.

    Args:
        err: jsonargparse's error; its chain of causes runs from the section (`Parser key "model"`)
            through the class (`Problem with given class_path '...'`) down to the mistake itself.
        argv: the command line (its config files are searched for a YAML syntax error).
        subcommand: the subcommand given, if any.
        known_keys: every option of the subcommand, for suggestions on a mistyped one.
    """
    chain = _chain(err)
    mistake = str(chain[-1]).strip()
    key = _key_path(chain)
    if missing := re.search(r"File does not exist: '(.+?)'", mistake):
        return (f"--{key or 'config'} {missing[1]}: the file does not exist. Check the path (a relative "
                f"path starts from the current folder, {Path.cwd()}).")
    if any(isinstance(error, yaml.YAMLError) for error in chain):
        return _yaml_syntax_error(argv) or f"a config is not valid YAML: {mistake}"
    if unknown := _unknown_option(mistake, key, chain, known_keys or []):
        option, close, where = unknown
        return (f"unknown option {option}." + (f" Did you mean {close}?" if close else "")
                + f" See the options with `adaptive-vit {subcommand or ''} {where}`.")
    if wrong := re.match(r"Expected a <class '(\w+)'>\. Got value: (.*)", mistake, re.S):
        return (f"{key}: expected {_expected_types(chain) or wrong[1]}, got {wrong[2]!r}. Fix the value on "
                f"the command line (--{key}) or in the config file.")
    if name := re.match(r"Expected a dot import path string: (.+)", mistake):
        close = _closest(name[1], _subclass_names(chain))
        return (f"{key}: no class {name[1]!r}." + (f" Did you mean {close}?" if close else "")
                + " Give a class name this tool knows or a full import path (package.module.Class).")
    if choice := re.search(r"invalid choice: '(.+?)' \(choose from (.+)\)", mistake):
        close = _closest(choice[1], re.findall(r"'(.+?)'", choice[2]))
        return f"unknown subcommand {choice[1]!r}." + (f" Did you mean {close}?" if close else "") + \
            f" The subcommands: {choice[2].replace(chr(39), '')}."
    return f"{key}: {mistake}" if key else mistake


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions it was raised from, outermost first."""
    chain = [err]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    return chain


def _key_path(chain: list[BaseException]) -> str:
    """The dotted option the chain is about (`model.init_args.thresholds`)."""
    parts: list[str] = []
    for error in chain:
        text = str(error)
        if key := re.match(r'Parser key "(.+?)"', text):
            part = key[1]
        elif text.startswith("Problem with given class_path"):
            part = "init_args"
        else:
            continue
        if not parts or parts[-1] != part:
            parts.append(part)
    return ".".join(parts)


def _unknown_option(mistake: str, key: str, chain: list[BaseException],
                    known_keys: list[str]) -> tuple[str, str | None, str] | None:
    """A mistyped option: its name, the known one closest to it and where all are listed."""
    if option := re.match(r"Option '(.+?)' is not accepted", mistake):  # a class's init argument
        class_path = next(m[1] for e in chain if (m := re.match(r"Problem with given class_path '(.+?)'", str(e))))
        init_args = key.rsplit(".init_args", 1)[0] + ".init_args"  # the option may be in a group (`backbone.`)
        options = [f"{init_args}.{k}" for k in _init_arguments(class_path)]
        typed, where = f"{key}.{option[1]}", f"--{key.split('.')[0]}.help {class_path.rsplit('.', 1)[-1]}"
    elif option := re.search(r"does not accept option '(.+?)'|unrecognized arguments: --?([^\s=]+)", mistake):
        options, typed, where = known_keys, option[1] or option[2], "--help"
    else:
        return None
    return typed, _closest(typed, options), where


def _closest(typed: str, known: list[str]) -> str | None:
    """The known name closest to a mistyped one; for a dotted option, first among its siblings
    (`checkpoint.monitr`: `checkpoint.monitor`, not `checkpoint.mode`)."""
    section, _, leaf = typed.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section}
    close = difflib.get_close_matches(leaf, list(siblings), n=1)
    if close:
        return siblings[close[0]]
    return next(iter(difflib.get_close_matches(typed, known, n=1)), None)


def _subclass_names(chain: list[BaseException]) -> list[str]:
    """The names of the classes a class option accepts: the subclasses of the base class in
    jsonargparse's Union report (`AdaptiveLitModule`: `StaticViTLitModule`, `CFViTLitModule`...)."""
    base = next((m[1] for e in chain if (m := re.search(r"Subtypes: \[<class '(.+?)'>", str(e)))), None)
    if base is None:
        return []
    classes, names = [_import_class(base)], []
    while classes:
        subclasses = classes.pop().__subclasses__()
        classes += subclasses
        names += [c.__name__ for c in subclasses]
    return names


def _init_arguments(class_path: str) -> list[str]:
    """The init arguments a config may give a class, as jsonargparse resolves them."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(_import_class(class_path))
    return list(parser.get_defaults(skip_validation=True).keys())


def _import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _expected_types(chain: list[BaseException]) -> str:
    """The types the innermost option accepts (`int or null`), from jsonargparse's Union report."""
    last_key = max((i for i, e in enumerate(chain) if re.match(r'Parser key "|Problem with given class_path', str(e))),
                   default=0)
    for error in chain[last_key:]:
        if subtypes := re.match(r"Does not validate against any of the Union subtypes\nSubtypes: \[(.+?)\]\n",
                                str(error)):
            names = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", subtypes[1]).replace("NoneType", "null")
            return " or ".join(names.split(", "))
    return ""


def _yaml_syntax_error(argv: list[str]) -> str | None:
    """Where the first YAML config file on the command line that does not parse goes wrong."""
    for arg in argv:
        path = Path(arg.split("=", 1)[-1])
        if path.suffix not in (".yaml", ".yml", ".json") or not path.is_file():
            continue
        try:
            yaml.safe_load(path.read_text())
        except yaml.MarkedYAMLError as err:
            mark, context = err.problem_mark, err.context_mark
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            around = f" ({err.context}, from line {context.line + 1})" if err.context and context else ""
            return f"{path}{where}: {err.problem}{around}. Fix the YAML syntax there."
        except yaml.YAMLError as err:
            return f"{path}: {err}. Fix the YAML syntax there."
    return None


def _root_message(err: BaseException) -> str:
    """The message of the mistake itself: an error a class raised while jsonargparse instantiated
    it comes wrapped in its report of every type it tried."""
    for error in _chain(err):
        if not str(error).startswith("Does not validate against any of the Union subtypes"):
            return str(error)
    return str(err)


# ---------------------------------------------------------------------------- entry point


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip")


def _quiet_lightning() -> None:
    """Keep off a user's screen what concerns Lightning, not them: its tip about a logging service,
    and torch's deprecation of an API that Lightning's own code calls."""
    rank_zero.log.addFilter(_not_a_tip)  # the logger of Lightning's rank_zero_info
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


def main(args: list[str] | None = None) -> AdaptiveViTCLI | None:
    """Entry point of `adaptive-vit` (also `python -m adaptive_vit`).

    Called with `args` (tests, scripts), it returns the CLI (trainer, model, datamodule) and lets
    errors propagate. On the command line it returns None (the console script passes the result
    to sys.exit), and a configuration mistake (a missing file, a mistyped option, a bad value, a
    checkpoint that does not load or fit) ends with its message and exit status 2 rather than a
    traceback; set ADAPTIVE_VIT_DEBUG=1 for the traceback. A fit stopped by SIGTERM exits with
    status 143 (128 + SIGTERM, as if killed: Lightning's own exit would report success to the
    scheduler).
    """
    if args is not None:
        return _run(args)
    try:
        _run(None)
    except SIGTERMException:
        print("adaptive-vit: stopped by SIGTERM; continue with the same command and "
              "--ckpt_path last", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except (ValueError, FileNotFoundError, MisconfigurationException) as err:
        if os.environ.get("ADAPTIVE_VIT_DEBUG"):
            raise
        print(f"adaptive-vit: error: {_root_message(err)}", file=sys.stderr)
        sys.exit(2)
    return None


def _check_config_spelling(args: list[str]) -> None:
    """Config files (`--config FILE`) written before the backbone became one group get a message
    with the new spelling instead of jsonargparse's "unexpected key"."""
    for index, arg in enumerate(args):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            args[index + 1] if arg == "--config" and index + 1 < len(args) else None)
        if path is None or not os.path.isfile(path):
            continue
        with open(path) as file:
            try:
                config = yaml.safe_load(file)
            except yaml.YAMLError:
                continue  # the parser reports it
        model = config.get("model") if isinstance(config, dict) else None
        if not isinstance(model, dict) or not isinstance(model.get("init_args"), dict):
            continue
        module = getattr(adaptive_vit.methods, str(model.get("class_path", "")).rsplit(".", 1)[-1], None)
        own = {name for cls in getattr(module, "__mro__", ()) if "__init__" in vars(cls)
               and cls is not AdaptiveLitModule and issubclass(cls, AdaptiveLitModule)
               for name in inspect.signature(cls.__init__).parameters}
        check_backbone_spelling(model["init_args"], own, path)


def _run(args: list[str] | None) -> AdaptiveViTCLI:
    keep_freed_memory()  # CPU work reuses freed tensor memory instead of page-faulting it afresh
    _quiet_lightning()
    return AdaptiveViTCLI(
        model_class=AdaptiveLitModule,
        datamodule_class=ImageDataModule,
        trainer_class=AdaptiveTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        parser_kwargs={"exit_on_error": False},  # errors reach `parse_arguments`
        args=args,
    )
