"""The error raised for bad user input: a ValueError that names the offending field."""


class InvalidInput(ValueError):
    """Bad input, detected before any work starts. `field` names what was wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidInput(field, message)
