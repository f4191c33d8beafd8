"""The errors jaxkd raises for bad input and failed runs; this module imports nothing of jaxkd.

Each message names the problem (the config key, the file, the step) in one line; the command
line prints it as ``jaxkd: error: ...`` instead of a traceback.
"""


class ConfigError(ValueError):
    """A bad configuration value, unknown name or option; the message names the key."""


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, locked work dir, config changed on resume)."""


class WorkdirBusy(TrainingError):
    """Another process holds the work dir's lock (it is training or reading that run)."""


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a checkpoint that does not fit the model."""


__all__ = ["CheckpointError", "ConfigError", "TrainingError", "WorkdirBusy"]
