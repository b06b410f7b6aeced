"""Entry point for ``python -m device_bench`` and for running the pushed directory as ``python device_bench``."""

from __future__ import annotations

import os
import sys

if not __package__:
    # Run as ``python path/to/device_bench``: Python executes this file with no package, so make the
    # directory's parent importable and continue as the real package.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from device_bench.cli import main  # noqa: E402  (must follow the sys.path fix above)

if __name__ == "__main__":
    sys.exit(main())
