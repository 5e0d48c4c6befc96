"""The `atelier` command line: thin commands over the core; errors mapped to exit codes once."""
