"""``python -m datamesh``: the demo and the operator commands."""

from __future__ import annotations

import sys

from datamesh.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
