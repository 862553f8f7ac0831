"""Command-line entry points: they parse, call the library, and return an exit code."""
