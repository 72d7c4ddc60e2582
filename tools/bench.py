"""Speed and memory of the re-routed forward pass against the plain one (see ``--help``).

The code lives in :mod:`kvemb_lab.bench.cli` (tested there); this file is its command line, same flags.
"""

from kvemb_lab.bench.cli import main

if __name__ == "__main__":
    main()
