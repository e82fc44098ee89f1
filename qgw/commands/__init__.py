"""Subcommands of `qgw`, one module per group."""
