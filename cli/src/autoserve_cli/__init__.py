"""The autoserve command line."""
