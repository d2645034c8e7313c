"""Compressed graph <-> files. Formats never import converters: they read and
write what the operators in `factorport.ops` hold, as specified in docs/FORMAT.md."""
