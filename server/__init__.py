"""The coordinator side of fedrelapse: ServerApp, strategy, run folders, researcher CLI."""
