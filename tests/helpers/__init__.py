"""Helpers shared by test modules (on the path through pytest.ini's `pythonpath = tests`): import them as
`from helpers.train import make_config`, never from another test module."""
