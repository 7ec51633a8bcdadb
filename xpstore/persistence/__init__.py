"""Durability: the write-ahead log, LMDB tables, recovery, the store layout and file helpers."""
