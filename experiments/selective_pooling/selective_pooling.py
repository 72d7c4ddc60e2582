"""Selective mean pooling: average only the text tokens the final token attends to most.

The code lives in :mod:`kvemb_lab.selective_pooling` (tested there); this file is its command line, same flags.
"""

from kvemb_lab.selective_pooling import main

if __name__ == "__main__":
    main()
