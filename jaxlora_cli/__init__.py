"""The `jaxlora` command line (a user of the jaxlora library, kept outside it)."""
