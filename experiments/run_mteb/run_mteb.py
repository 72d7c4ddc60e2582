"""Run a saved KV-Embedding (or baseline) model through MTEB on a list of tasks.

The code lives in :mod:`kvemb_lab.run_mteb` (tested there); this file is its command line, same flags.
"""

import sys

from kvemb_lab.run_mteb import main

if __name__ == "__main__":
    sys.exit(main())
