"""``python -m ad_eval ...``: same as the ``ad-eval`` console script."""

import sys

from ad_eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
