"""Texts longer than the token budget: truncation vs chunks averaged, on dev documents.

The code lives in :mod:`kvemb_lab.long_documents` (tested there); this file is its command line, same flags.
"""

from kvemb_lab.long_documents import main

if __name__ == "__main__":
    main()
