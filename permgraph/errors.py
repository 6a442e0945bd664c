"""permgraph's exceptions. Every message says what is wrong and what to do about it."""


class PermgraphError(Exception):
    """Base class of permgraph's errors."""


class TraceError(PermgraphError):
    """The model could not be traced (torch.export failed, or example inputs are needed)."""

    details: str = ""  # what torch logged or printed while the export failed (not printed to stderr)


class SpecMismatchError(PermgraphError, ValueError):
    """A spec, permutation or state dict does not belong to the model it is used with."""


class VerificationError(PermgraphError):
    """A permutation changed the model's function."""


class FileFormatError(PermgraphError, ValueError):
    """A file permgraph reads is corrupted, truncated or not of the expected kind."""


class UnknownNameError(PermgraphError, ValueError):
    """A model or data-set name that permgraph does not know."""
