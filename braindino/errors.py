"""The one exception type for bad user input: which file, what is wrong, what to do."""


class InputError(Exception):
    """A problem with one input file (or manifest) that the user can fix.

    ``str(err)`` is a single line: ``"{path}: {cause} — {hint}"``. It never contains DICOM header fields.
    """

    def __init__(self, path, cause: str, hint: str):
        self.path = str(path)
        self.cause = cause
        self.hint = hint
        super().__init__(f"{self.path}: {cause} — {hint}")
