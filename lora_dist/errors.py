"""The errors that mean "bad input", reported by the CLI as one line (exit code 2)."""

from __future__ import annotations

from lora_dist.adapter import AdapterError
from lora_dist.checkpoint import ResumeError
from lora_dist.config import ConfigError
from lora_dist.data import DataError
from lora_dist.launch import LaunchError
from lora_dist.export import ExportError
from lora_dist.model_dir import ModelDirError
from lora_dist.lora import LoRAConfigError
from lora_dist.merge import MergeError
from lora_dist.train import OutputDirError, TrainingDiverged

USER_ERRORS: tuple[type[BaseException], ...] = (
    AdapterError,
    ModelDirError,
    ConfigError,
    DataError,
    ExportError,
    LaunchError,
    LoRAConfigError,
    MergeError,
    ResumeError,
    OutputDirError,
    TrainingDiverged,
    FileExistsError,
    PermissionError,
)
