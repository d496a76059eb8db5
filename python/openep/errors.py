"""OpenEP's exceptions.

Every failure reported by the C++ core (``openep::Error``) reaches Python as :class:`OpenEPError` with the
core's message unchanged and ``code`` set to the core's error code name. Argument checks done in Python raise
the same class (``code == "invalid_argument"``), so one ``except openep.OpenEPError`` catches everything
OpenEP raises on purpose.
"""

__all__ = ["OpenEPError", "OpenEPNotAvailableError", "ERROR_CODES"]

#: Every value :attr:`OpenEPError.code` can take (the C++ ``openep::ErrorCode``; see include/openep/error.hpp).
ERROR_CODES = (
    "invalid_argument",   # a caller-supplied argument is wrong (shape, dtype, range, alignment)
    "buffer_too_small",   # the request does not fit the Buffer; the message names the size needed
    "cuda",               # a CUDA runtime call failed
    "nccl",               # an NCCL call failed
    "version_mismatch",   # the loaded NCCL differs from the one OpenEP was compiled against
    "timeout",            # a wait on a peer exceeded the timeout (message names rank, peer and phase)
    "device_check",       # a kernel found invalid input on the device (e.g. an expert id out of range)
    "buffer_failed",      # the Buffer saw an earlier error and refuses further work until destroyed
    "unsupported",        # a valid request this build or topology does not support yet
    "internal",           # a broken invariant inside OpenEP
    "not_available",      # the capability exists in DeepEP V1 but has not landed in OpenEP yet
)


class OpenEPError(RuntimeError):
    """An error reported by OpenEP.

    Attributes:
        code: one of :data:`ERROR_CODES`, e.g. ``"invalid_argument"`` or ``"timeout"``.
        message: the full message (also ``str(err)``); it names the argument or phase, the expected value
            and the value seen.
    """

    def __init__(self, message, code="internal"):
        super().__init__(message)
        self.message = message
        self.code = code

    def __reduce__(self):  # picklable across processes (test workers report errors through queues)
        return (type(self), (self.message, self.code))


class OpenEPNotAvailableError(OpenEPError, NotImplementedError):
    """A DeepEP V1 capability that OpenEP does not provide yet (e.g. shrink mode).

    It is both an :class:`OpenEPError` (``code == "not_available"``) and a ``NotImplementedError``.
    """

    def __init__(self, message, code="not_available"):
        super().__init__(message, code)


def invalid_argument(message):
    """The OpenEPError for a bad argument detected in Python."""
    return OpenEPError("OpenEP invalid argument: " + message, "invalid_argument")


def not_available(what, detail=None):
    """The OpenEPNotAvailableError for a DeepEP V1 capability that has not landed in OpenEP yet."""
    if detail is None:
        detail = ("intranode normal mode (get_dispatch_layout/dispatch/combine) and low-latency mode "
                  "(low_latency_dispatch/low_latency_combine) work")
    return OpenEPNotAvailableError(f"OpenEP not available: {what} is not available yet in OpenEP ({detail})")
