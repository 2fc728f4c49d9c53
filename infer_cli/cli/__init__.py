"""The command line: one module per command, the shared option types, the output object."""
