"""hotcold.cli: thin command-line front ends over the Python API."""
