"""The one exception type users see: every bad input raises a SmolVLMError whose message names the problem."""


class SmolVLMError(Exception):
    """Bad input or a checkpoint we can't use. The message is meant to be shown to a person as is."""


class CheckpointError(SmolVLMError, FileNotFoundError):
    """A checkpoint folder or hub repo that can't be found, fetched or read."""


class ConfigError(SmolVLMError, ValueError):
    """A config file whose content we can't use; the message names the file and the field."""


class InputError(SmolVLMError, ValueError):
    """A request (text, image, video, sampling parameters) we can't use; the message names the item."""
