"""The one exception type users see: a single line that says what is wrong and how to fix it."""


class WorkbenchError(ValueError):
    """Bad input or state. The message is one line and names the fix; the CLI prints it as is."""
