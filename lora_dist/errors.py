"""The errors that mean "bad input or environment": the CLI reports them as one line, exit code 2."""

from __future__ import annotations

from lora_dist.adapter import AdapterError
from lora_dist.checkpoint import ResumeError, TrainingDiverged
from lora_dist.config import ConfigError
from lora_dist.data import DataError
from lora_dist.demo import DemoFailed
from lora_dist.dtypes import DTypeError
from lora_dist.export import ExportError
from lora_dist.generate import GenerateError
from lora_dist.launch import LaunchError
from lora_dist.lora import LoRAConfigError
from lora_dist.merge import MergeError
from lora_dist.model_dir import ModelDirError
from lora_dist.outputs import OutputDirError, OutputError
from lora_dist.plot import PlotError
from lora_dist.parallel.sharding import ShardingError
from lora_dist.slurm import SlurmError
from lora_dist.tracking import TrackingError

__all__ = ["USER_ERRORS"]

USER_ERRORS: tuple[type[BaseException], ...] = (
    AdapterError,
    ConfigError,
    DataError,
    DemoFailed,
    DTypeError,
    ExportError,
    GenerateError,
    LaunchError,
    LoRAConfigError,
    MergeError,
    ModelDirError,
    OutputDirError,
    OutputError,
    PlotError,
    ResumeError,
    ShardingError,
    SlurmError,
    TrackingError,
    TrainingDiverged,
    FileExistsError,
    PermissionError,
)
