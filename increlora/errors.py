"""Exception types raised by the project. Each message says what to do about it."""


class IncreLoraError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(IncreLoraError, ValueError):
    """An IncreLoraConfig field is out of range or inconsistent."""


class TargetModulesError(IncreLoraError, ValueError):
    """No module of the model matches the configured target modules."""


class AdapterFormatError(IncreLoraError, ValueError):
    """An adapter folder is missing files, has corrupted tensors, or an unsupported version."""


class BaseModelMismatchError(IncreLoraError, ValueError):
    """An adapter was trained on another base model than the one it is being loaded into."""


class CheckpointError(IncreLoraError, ValueError):
    """A training checkpoint cannot be restored into this model/optimizer."""


class AssetError(IncreLoraError, RuntimeError):
    """A pinned asset (the default backbone, an offline dataset) could not be downloaded, verified or extracted."""
