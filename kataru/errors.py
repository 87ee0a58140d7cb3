"""One exception type for everything a user can get wrong.

The CLI prints a KataruError as one line and exits with code 2; anything else is a bug in kataru and
keeps its traceback.
"""


class KataruError(Exception):
    """A problem with the user's input, stated with the fix."""
