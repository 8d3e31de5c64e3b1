"""The command line: ``python -m datamesh COMMAND``; each command lives in its own module."""
