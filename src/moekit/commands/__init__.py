"""One module per ``moekit`` subcommand; each exposes ``register(subparsers)``."""
