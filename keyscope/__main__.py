"""``python -m keyscope …`` is the ``keyscope`` command, so ``torchrun -m keyscope covariance …`` works."""

import sys

from keyscope.cli import main

if __name__ == "__main__":
    sys.exit(main())
