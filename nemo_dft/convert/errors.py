"""Errors raised by checkpoint conversion.

Each message names the offending file or directory and the key, so that a user can fix the
input without reading a NeMo traceback.
"""

from __future__ import annotations


class ConversionError(Exception):
    """A conversion input cannot be converted as asked."""


class MissingFileError(ConversionError, FileNotFoundError):
    """A file or directory that the conversion needs does not exist."""


class UnsupportedArchitectureError(ConversionError):
    """The checkpoint is of an architecture that nemo_dft does not convert."""


class ConfigMismatchError(ConversionError):
    """The checkpoint's config contradicts the requested architecture or the weight layout."""
