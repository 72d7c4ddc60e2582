"""Cost of the template tokenizer against one plain batched tokenizer call.

The code lives in :mod:`kvemb_lab.bench.tokenization` (tested there); this file is its command line, same flags.
"""

from kvemb_lab.bench.tokenization import main

if __name__ == "__main__":
    main()
