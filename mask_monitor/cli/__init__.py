"""The ``mask-monitor`` command line: one module per subcommand, central errors and output."""
