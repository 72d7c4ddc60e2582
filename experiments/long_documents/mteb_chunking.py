"""Chunking on vs off on MTEB's Imdb and SciFact (code and flags: :mod:`kvemb_lab.mteb_chunking`)."""

from kvemb_lab.mteb_chunking import main

if __name__ == "__main__":
    main()
