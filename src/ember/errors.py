"""The one exception type for mistakes a user can fix (bad recipe, missing file,
corrupt checkpoint, non-finite loss). The CLI prints its message and exits 2;
anything else is a bug and keeps its traceback."""


class EmberError(Exception):
    """A user-fixable error; the message names the cause and the fix."""
