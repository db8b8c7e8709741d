"""`python -m pacs ...`, the same as the `pacs` command; what torchrun starts:

    torchrun --standalone --nproc-per-node 2 -m pacs train --preset smoke --out-dir runs/smoke
"""

import sys

from pacs.cli import main

if __name__ == "__main__":
    sys.exit(main())
