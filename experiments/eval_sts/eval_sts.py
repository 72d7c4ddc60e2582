"""Evaluate one or many embedding methods on one base model: sentences, documents and long inputs.

The code lives in :mod:`kvemb_lab.eval_sts` (tested there); this file is its command line, same flags.
"""

from kvemb_lab.eval_sts import main

if __name__ == "__main__":
    main()
