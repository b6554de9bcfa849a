"""Typed errors for bad user input: each message names the file or key and the fix."""

from __future__ import annotations


class MedsegError(Exception):
    """Base class for errors caused by user input; the CLI prints them as one line and exits 1."""


class DataError(MedsegError):
    """A data folder, image or label is missing or malformed."""


class BundleError(MedsegError):
    """A bundle path, config file or config override is invalid."""


class CheckpointError(MedsegError):
    """A checkpoint is missing or does not fit the bundle's network."""


class ConfigValueError(BundleError, ValueError):
    """A bundle config value is out of its range (also a ``ValueError`` for library callers)."""
