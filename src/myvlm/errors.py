"""One exception type for everything a user can get wrong, so the CLI can print it as one line."""


class MyVLMError(Exception):
    """A problem with the user's input, files or library, explained in one line."""
