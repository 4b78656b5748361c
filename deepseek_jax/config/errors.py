"""The one error type of the config package, and the helper every invariant raises it through."""


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


def require(ok: bool, msg: str) -> None:
    """Raises ConfigError(msg) unless `ok`."""
    if not ok:
        raise ConfigError(msg)
