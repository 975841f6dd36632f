"""The one error type of the data layer: a dataset a user brought that cannot be used as it is."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset problem a user can fix; the message names the file, the row (1-based), the field and the fix."""
