"""The exceptions flagscale raises for problems a user can fix.

Every message says what is wrong, where (file, line, key, tensor), expected vs actual, and what to do.
The CLI prints these without a traceback unless ``--debug`` is given.
"""


class FlagScaleError(Exception):
    """Base class of every user-facing flagscale error."""


class ConfigError(FlagScaleError):
    """A config file, override or derived layout is invalid."""


class DataError(FlagScaleError):
    """Input data, a dataset prefix or a tokenizer is missing or inconsistent."""


class CheckpointError(FlagScaleError):
    """A checkpoint is missing, incomplete or incompatible with the requested run."""


class OutputError(FlagScaleError):
    """A command's output path would replace or land inside its input, a training run, a
    checkpoint, or a directory the command did not write."""


class ConversionError(FlagScaleError):
    """A Hugging Face <-> megatron-core conversion cannot proceed or failed validation."""


class PlatformError(FlagScaleError):
    """The software or hardware environment cannot run flagscale as installed (e.g. a
    megatron-core other than the pinned release under a fix written for that release)."""
