"""The one exception type for user errors (bad config, bad data, bad checkpoint).

The CLI turns it into a one-line message and exit code 2; anything else is a bug and keeps its traceback.
"""


class LMError(Exception):
    """A problem with what the user gave us. The message names the file/line/key and says what was expected."""
