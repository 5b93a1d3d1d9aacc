"""The pipeline's command line: `--config FILE` plus any number of `--set section.field=value` overrides
(read the way every CLI reads its config: `schemas/flags.py`)."""
from __future__ import annotations

import argparse

from schemas.config import PipelineConfig, load_config
from schemas.flags import add_config_flags


def parser(description: str) -> argparse.ArgumentParser:
    return add_config_flags(argparse.ArgumentParser(description=description), PipelineConfig,
                            config_default="configs/sample.yaml")


def parse_config(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)
