"""The vocabulary every layer shares: records, the codec, ``where`` filters, effects of operations
and the priority-input rows. Imports nothing else of xpstore but ``errors``."""
