"""Which label-free window rule carries to all backbones; the rule is ``RULE.md`` here.

The code lives in :mod:`kvemb_lab.window_rules` (tested there); this file is its command line, same flags.
"""

from kvemb_lab.window_rules import main

if __name__ == "__main__":
    main()
