"""Errors raised by :mod:`jaxkd.data`."""

from __future__ import annotations


class DatasetNotFoundError(ValueError):
    """A data set is unknown, or known but not available (not prepared, files missing).

    The message names the data set and says how to get it.
    """
