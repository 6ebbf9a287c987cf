"""Typer front ends. Commands parse options, call one library function and render the result."""
