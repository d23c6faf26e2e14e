"""The training plan: schema and validation, command-line overrides, the user's own config formats, what the model can run."""
