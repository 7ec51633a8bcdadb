"""Similar-track lookup (DESIGN §5; docs/index.md).

``embedding`` (hybrid vectors), ``default_stats`` (the statistics used before the first build,
a committed table), ``rows`` (fingerprint numbers read from envelopes), ``backends`` (exact /
HNSW / IVF FAISS indexes, checksummed files, the one boundary for FAISS errors), ``serving``
(main index + exact delta + tombstones), ``build`` (one build, in a thread or a child process),
``manager`` (attach, the acknowledgement-path hook, blue-green rebuilds), ``neighbors``
(precomputed lists and the ``Neighbor`` answer type). The store attaches this package lazily, at
the first similar-track call: nothing imports FAISS before that.
"""
