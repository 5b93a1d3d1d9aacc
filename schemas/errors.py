"""The one exception type for mistakes a user can cause and fix."""


class UserError(Exception):
    """A bad config, URL list, path or endpoint: the message is one sentence that says what to do.

    Entry points print it without a traceback and exit with status 2.
    """
