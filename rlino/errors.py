"""The one exception type that means "the user asked for something impossible".

The CLI turns it into a one-line message and exit code 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (bad config, missing file, malformed record), reported in one line."""
