"""Records, codec, state derivation, the applier and the Store facade."""
