"""Apply the written defaults rule to the dev results of the backbones and print the ranking.

The code lives in :mod:`kvemb_lab.choose_defaults` (tested there); this file is its command line, same flags.
"""

from kvemb_lab.choose_defaults import main

if __name__ == "__main__":
    main()
