"""The ``uniroute`` command line: ``main.py`` builds the parser; each command module parses, calls, prints."""
