"""tmu-admin index ...: placeholder until the index commands land."""
