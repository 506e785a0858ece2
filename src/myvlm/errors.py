"""One exception type for everything a user can get wrong, so the CLI can print it as one line."""


class MyVLMError(Exception):
    """A problem with the user's input, files or library, explained in one line."""


class UnusableImage(MyVLMError):
    """An image the model's processor refuses (e.g. too elongated): a library job records it and goes on."""
