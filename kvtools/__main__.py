"""``python -m kvtools`` runs the command line (see :mod:`kvtools.cli`)."""

from kvtools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
