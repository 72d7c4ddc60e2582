"""The document levers, measured on dev data (stages ``probe``, ``score``, ...); the rule is ``RULE.md`` here.

The code lives in :mod:`kvemb_lab.doc_levers` (tested there); this file is its command line, same flags.
"""

from kvemb_lab.doc_levers import main

if __name__ == "__main__":
    main()
