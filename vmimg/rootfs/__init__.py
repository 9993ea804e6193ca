"""Stage 2, root file systems: layers flattened into a Tree, and the writers that serialise it."""
