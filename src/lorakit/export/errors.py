"""The one error type export raises for bad input; the CLI prints it as one line and exits 2."""


class ExportError(ValueError):
    """An export that cannot be made as asked; the message names the file or field and what to change."""
