"""The engine: the write-ahead log and its reader, LMDB tables, the overlay, the applier,
recovery, the store layout, the lock and the file-system seam."""
