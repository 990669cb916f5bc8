"""User-facing errors: one line that names the problem and the fix."""


class PressError(ValueError):
    """A press was misconfigured or applied where it cannot work. The message is shown to users as is."""
