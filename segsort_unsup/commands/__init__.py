"""One module per CLI command; each resolves options and calls one library function."""
