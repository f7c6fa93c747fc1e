"""What the model and training configs share: they are stored in every result record."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, TypeVar

__all__ = ["RecordedConfig"]

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
