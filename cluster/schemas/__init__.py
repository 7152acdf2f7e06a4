"""One typed config per stage. Each module is owned by the stage it configures; they live here, in the
lowest layer, so that every layer (and the CLI, before Ray starts) can validate a whole recipe."""
