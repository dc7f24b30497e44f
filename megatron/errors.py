"""The error types of the framework, under one base: every `MegatronError` is bad input or a bad environment
that the user can fix, and its message names the input and the fix. Entry points catch `MegatronError` and
exit 2 with the message, without a traceback (docs/RELIABILITY.md lists the exit codes).

A leaf module: each package raises its own subclass (DataListError, TokenizerError, ...) defined beside the
code that detects it; the two that several packages raise live here.
"""

from __future__ import annotations


class MegatronError(Exception):
    """Bad input or a bad environment, with a message naming it and the fix."""

    exit_code = 2


class ConfigError(MegatronError, ValueError):
    """Flags (or a config file) that do not describe a valid run; the same verdict on every rank."""


class CheckpointError(MegatronError, RuntimeError):
    """A checkpoint that cannot be read or written; the message names the path and what to do."""
