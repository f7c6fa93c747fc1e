"""What the model and training configs share: they are stored in every result record."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, TypeVar

__all__ = ["RecordedConfig", "check_new_name"]

Config = TypeVar("Config", bound="RecordedConfig")


class RecordedConfig:
    """Mixin for frozen dataclasses that round-trip through a result record's JSON."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[Config], values: dict[str, Any]) -> Config:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**values)


def check_new_name(name: object, registry: dict, what: str, example: str) -> None:
    """Refuse a registry name that is not an identifier or is taken (so a typo cannot shadow one).

    Args:
        name: the name to register.
        registry: the registry it goes into.
        what: what the registry holds, for the message (``"task"``, ``"attention variant"``).
        example: a valid name, for the message.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name: expected an identifier such as {example!r}, got {name!r}")
    if name in registry:
        raise ValueError(f"name: {what} {name!r} is already registered")
