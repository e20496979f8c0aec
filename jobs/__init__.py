"""Job files and the commands that run them: the top layer (nothing imports it)."""
