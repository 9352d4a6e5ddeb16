"""The export stage's errors: one base type, so a caller catches the stage's failures in one clause.
Every message names the problem and the fix."""


class ExportError(ValueError):
    """The export cannot proceed (bad option, existing output, a stage invariant broken)."""


class ConfigError(ExportError):
    """config.json describes something we cannot export; the message names the key and the fix."""


class CheckpointError(ExportError):
    """The checkpoint folder is incomplete or does not match config.json; the message says what to fix."""
