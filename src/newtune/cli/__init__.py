"""The `newtune` command line: one module per command, each runnable with `python -m`."""
