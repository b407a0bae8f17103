"""The ``esreid`` subcommands, one module per group."""
