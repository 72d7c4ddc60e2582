"""Every SDPA backend forced in turn against float64 math (``tools/gpu_check.sh run`` runs it on a GPU).

The code lives in :mod:`kvemb_lab.backend_check` (tested there); this file is its command line, same flags.
"""

import sys

from kvemb_lab.backend_check import main

if __name__ == "__main__":
    sys.exit(0 if main() else 1)
