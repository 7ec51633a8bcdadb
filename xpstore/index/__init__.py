"""Similar-track lookup (hybrid embeddings, FAISS, blue-green rebuilds): arrives with issue 4.

Nothing is implemented here yet and nothing imports this package; it exists so the package
layout of DESIGN §2 is in place.
"""
