"""The Store facade and the components it composes (writer, reader, one per capability)."""
