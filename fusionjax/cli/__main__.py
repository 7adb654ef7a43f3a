"""``python -m fusionjax.cli``: the ``fusionjax`` console script."""

import sys

from fusionjax.cli._main import main

if __name__ == "__main__":
    sys.exit(main())
