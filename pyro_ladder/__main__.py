"""``python -m pyro_ladder``: the same as the ``pyro-ladder`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
