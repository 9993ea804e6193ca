"""Stage 4, bundles: the bundle format (vm.json, file roles, validation) and building bundles."""
