"""Regenerate the shipped calibration sets ``kvemb_st/data/calibration*.txt`` from STS-B train.

The code lives in :mod:`kvemb_lab.make_calibration_set` (tested there); this file is its command line, same flags.
"""

from kvemb_lab.make_calibration_set import main

if __name__ == "__main__":
    main()
