"""The project's own error for bad input: every parser raises this and nothing else."""


class ParseError(ValueError):
    """Input bytes that do not form the structure being parsed."""
