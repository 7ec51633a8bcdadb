"""Similar-track lookup (issue 4, in progress).

Done: ``embedding`` (hybrid embeddings: per-dimension standardization of the 25 named audio
values, block weighting, checksummed statistics) and ``backends`` (exact, HNSW and IVF-Flat FAISS
indexes behind one interface, with checksum-verified persistence). Not built yet, so nothing
imports this package from the store: serving (main index + delta + tombstones), blue-green
rebuilds, ``Store.similar``, the CLI and the neighbour lists.
"""
