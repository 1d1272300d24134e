"""``python -m nmosd_ms`` runs the CLI."""

from .cli import main

main()
