"""The operator's tools, working on a store's files whether or not it opens: inspect and verify,
replay, snapshots, compaction, salvage. The Store's own ``check``/``snapshot``/``compact`` call
them, so they sit below the store package."""
