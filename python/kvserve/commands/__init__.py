"""Subcommands of the `kvserve` CLI, one module each."""
