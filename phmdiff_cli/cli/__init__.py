"""The thin Typer layer: parse options, validate, call the engine, map errors to exit codes."""
