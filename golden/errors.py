"""The one exception type bbct raises for bad input; the CLI prints it without a traceback."""


class BbctError(ValueError):
    """Bad input to bbct: the message names the file, node, field or value at fault."""
