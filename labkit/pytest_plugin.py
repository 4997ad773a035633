"""labkit's pytest plugin (entry point pytest11: labkit): the `fake_lab` fixture."""
