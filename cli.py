"""The ``litplug`` command: LightningCLI with litplug's classes resolvable by short name.

    litplug fit --config configs/digits/classifier.yaml
    litplug fit --config configs/digits/classifier.yaml --config configs/callbacks/ema.yaml
    litplug test --config runs/litplug/version_0/config.yaml --ckpt_path best

``model`` and ``data`` are in subclass mode (any LightningModule / LightningDataModule by
``class_path``); the default logger is TensorBoard under ``runs/``; the saved ``config.yaml`` is
overwritten when a run reuses a log folder.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

# Imported for their side effect: jsonargparse resolves `class_path: EMA` among loaded subclasses.
import litplug.callbacks  # noqa: F401
import litplug.datamodules  # noqa: F401
import litplug.modules  # noqa: F401

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "litplug"},
}


class LitplugCLI(LightningCLI):
    """LightningCLI with litplug's defaults (see module docstring)."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        trainer_defaults = {"logger": DEFAULT_LOGGER, **kwargs.pop("trainer_defaults", {})}
        save_config_kwargs = {"overwrite": True, **kwargs.pop("save_config_kwargs", {})}
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults,
            save_config_kwargs=save_config_kwargs,
            auto_configure_optimizers=False,  # modules own their optimizer via OptimizerCallable
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After `fit`, run `test` on the final weights when the datamodule has a test set.",
        )

    def after_fit(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        if config.get("test_after_fit", True) and self.datamodule is not None:
            if type(self.datamodule).test_dataloader is not LightningDataModule.test_dataloader:
                self.trainer.test(self.model, datamodule=self.datamodule)


def main(args: Any = None) -> None:
    """Entry point of the ``litplug`` console script; ``args`` as in ``LightningCLI``."""
    LitplugCLI(args=args)


if __name__ == "__main__":
    main()
