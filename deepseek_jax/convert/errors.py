"""The one error type of checkpoint conversion."""


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked: a missing, unexpected, mis-shaped or mis-typed tensor,
    a damaged file, or a config value the model does not implement. The message names the file, the
    tensor or the config field."""
