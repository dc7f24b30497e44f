"""The error types of the framework, under one base: every `MegatronError` is bad input or a bad environment
that the user can fix, and its message names the input and the fix. Entry points catch `MegatronError` and
exit with its `exit_code` (2) and the message, without a traceback (docs/RELIABILITY.md lists the exit codes);
the one exception to "the user can fix it" is CollectiveFailure (exit 3: a rank stopped answering).

A leaf module: each package raises its own subclass (DataListError, TokenizerError, ...) defined beside the
code that detects it; the two that several packages raise live here.
"""

from __future__ import annotations


class MegatronError(Exception):
    """Bad input or a bad environment, with a message naming it and the fix.

    `same_on_every_rank`: whether every rank reaches the same verdict (flags, the layout, the LR schedule), so
    that one rank says it for all; otherwise the error may concern one rank's files (a checkpoint, a data or
    tokenizer file) and every rank that sees it says so, naming itself. `exit_code`: what an entry point exits
    with (2; CollectiveFailure, a rank that stopped answering, is 3)."""

    exit_code = 2
    same_on_every_rank = False


class ConfigError(MegatronError, ValueError):
    """Flags (or a config file) that do not describe a valid run; the same verdict on every rank."""

    same_on_every_rank = True


class CheckpointError(MegatronError, RuntimeError):
    """A checkpoint that cannot be read or written; the message names the path and what to do."""
