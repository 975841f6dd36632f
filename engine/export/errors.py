"""The one error every export raises for a checkpoint, run or option it cannot turn into a correct file."""


class ExportError(ValueError):
    """A checkpoint or option the export cannot turn into a correct file."""
