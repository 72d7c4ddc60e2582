"""How much attention the re-routed prefix slot draws, per layer, on real sentences.

The code lives in :mod:`kvemb_lab.prefix_attention` (tested there); this file is its command line, same flags.
"""

from kvemb_lab.prefix_attention import main

if __name__ == "__main__":
    main()
