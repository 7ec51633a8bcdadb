"""Similar-track lookup (issue 4, in progress).

Done: ``embedding`` (hybrid embeddings: per-dimension standardization of the 25 named audio
values, block weighting, checksummed statistics). Not built yet, so nothing imports this package
from the store: the FAISS index backends, serving (main index + delta + tombstones), blue-green
rebuilds, ``Store.similar`` and the neighbour lists.
"""
