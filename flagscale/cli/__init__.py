"""Command-line entry points: one module per command, each a thin wrapper."""


def examples_epilog(doc: str) -> str:
    """The ``flagscale ...`` usage lines of a command module's docstring, as ``--help`` text."""
    return "examples:\n" + "\n".join(line for line in doc.splitlines()
                                     if line.startswith("    flagscale"))
