"""The ``megacpp`` command line: one module per subcommand."""
