"""One module per CLI stage, plus the shared Ray Train glue and the demo."""
