"""The ``hyperbagel`` command: Lightning's CLI over every stage and data module of the package.

Models and data modules are chosen by class path (subclass mode), so a new stage or data set is
usable from YAML without touching this file.
"""

from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI

from hyperbagel.cpu_precision import cpu_training_precision


class HyperBagelCLI(LightningCLI):
    """LightningCLI with hyperbagel's defaults.

    Stages build their own optimizers from optimizer classes given as init args, so the CLI adds
    no ``--optimizer``/``--lr_scheduler`` options. The resolved config is saved beside the logs and
    may be overwritten, so a run repeated into the same directory does not fail at the end of setup.
    Config files go through OmegaConf, so a stage config can interpolate values such as
    ``${trainer.max_steps}``, resolved once every config file and argument is in (jsonargparse's
    ``omegaconf+`` mode; resolved per file, a later ``--trainer.max_steps`` left a schedule's
    ``total_steps`` at the first file's value); ``prog`` keeps usage messages the same under
    ``python -m hyperbagel``.
    A bf16 precision on a CPU without native bf16 becomes float32 (see `hyperbagel.cpu_precision`).
    """

    def __init__(self, args: ArgsType = None, **kwargs: Any) -> None:
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"prog": "hyperbagel", "parser_mode": "omegaconf+"})
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=args,
            **kwargs,
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        trainer["precision"] = cpu_training_precision(trainer.get("precision"), trainer.get("accelerator"))


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``hyperbagel`` console script; ``args`` defaults to ``sys.argv[1:]``."""
    HyperBagelCLI(args=args)
