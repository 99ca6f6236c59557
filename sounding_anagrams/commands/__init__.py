"""The commands' implementations (``run_<command>(args)``) and what they share; ``cli.py`` parses the command
line and dispatches here. Kept free of torch at import: each command loads the heavy libraries itself, once
its arguments are checked."""
