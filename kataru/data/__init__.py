"""Data sets, below both training and evaluation: corpora (Aozora Bunko cleaning, deduplication, splits,
packed token files), JGLUE's files, and the instruction data derived from them."""
