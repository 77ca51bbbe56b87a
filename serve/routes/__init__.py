"""One module per public API; each holds its schemas and thin routes."""
