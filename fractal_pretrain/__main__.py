"""``python -m fractal_pretrain ...``: same as the ``fractal-pretrain`` console script."""

import sys

from fractal_pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
