"""The base of every config section and component ``Options``: numbers are finite and
TOML ``true``/``false`` is never taken as a number (a module of its own so that sections
defined outside loop/config.py, such as ``[guards]``, can use it without an import cycle)."""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _is_number_field(annotation) -> bool:
    """int / float / Optional of them (not bool, not a union that admits bool)."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and bool not in args and all(_is_number_field(a) for a in args)
    return False


class Checked(BaseModel):
    """Base of every config section and component ``Options``: numbers are finite
    (``inf``/``nan`` refused), and TOML ``true``/``false`` is never taken as a number."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value, info: ValidationInfo):
        field = cls.model_fields.get(info.field_name)
        if isinstance(value, bool) and field is not None and _is_number_field(field.annotation):
            raise ValueError(f"{str(value).lower()} is not a number; write a number")
        return value
