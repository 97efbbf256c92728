"""The errors a person may see, in a module that imports nothing heavy, so that the
command-line tools can name them without loading numpy or pyfuse3 first."""


class FormatError(Exception):
    """The region does not hold a usable pmemfs; the message says why, on one line."""


class MountError(Exception):
    """The region cannot be served; the message is one line for a person."""
