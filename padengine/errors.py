"""The errors a caller handles: bad input (a ValueError that names the offending field, and its checks), and
an engine used after `close`."""
import math


class InvalidInput(ValueError):
    """Bad input, detected before any work starts. `field` names what was wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class EngineClosed(RuntimeError):
    """The engine was closed (`Engine.close`): its models and caches are gone."""


def require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidInput(field, message)


def require_int(value, field: str) -> None:
    require(isinstance(value, int) and not isinstance(value, bool), field, f"must be an integer, got {value!r}")


def require_finite(value, field: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    require(ok, field, f"must be a finite number, got {value!r}")


def require_range(value, low: float, high: float, field: str) -> None:
    require_finite(value, field)
    require(low <= value <= high, field, f"must be in [{low}, {high}], got {value!r}")
