"""The one exception type a user sees.

Anything the user can fix (a missing folder, a bad recipe key, a corrupt image) raises `FinetuneError`
with a single line that names the file or key and says what to do. The CLI prints that line and exits
with status 2 instead of showing a traceback.
"""


class FinetuneError(Exception):
    """A problem with the user's input, explained in one line."""
