"""The ``kiln`` command line: one module per subcommand."""
