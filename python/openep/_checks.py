"""Argument checks done in Python before anything reaches the core (no GPU needed to run them).

They work on anything tensor-like (``shape``, ``dtype``, ``device``, ``is_contiguous()``), which is what lets the
CPU tests exercise them without PyTorch. Every failure is an OpenEPError(code="invalid_argument") whose message
names the operation, the argument, what was expected and what was seen.
"""

from .errors import invalid_argument


def dtype_name(dtype):
    s = str(dtype)
    return s[len("torch."):] if s.startswith("torch.") else s


def shape_str(shape):
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"


def is_tensor_like(t):
    return hasattr(t, "shape") and hasattr(t, "dtype") and hasattr(t, "device")


def check_tensor(op, name, t, dtypes=None, shape=None, contiguous=False, device=None):
    """Checks one tensor argument.

    Args:
        op: operation name for the message (e.g. "dispatch").
        name: argument name.
        dtypes: allowed dtype names (e.g. ("bfloat16",)), or None for any.
        shape: expected shape, None entries match any size (its length fixes the number of dimensions).
        contiguous: require a contiguous (row-major) tensor.
        device: expected device string (e.g. "cuda:0"), or None.
    """
    if not is_tensor_like(t):
        raise invalid_argument(f"{op}: {name} expected a tensor, got {type(t).__name__}")
    if dtypes is not None and dtype_name(t.dtype) not in dtypes:
        raise invalid_argument(f"{op}: {name} expected dtype {' or '.join(dtypes)}, got {dtype_name(t.dtype)}")
    if shape is not None:
        seen = tuple(t.shape)
        ok = len(seen) == len(shape) and all(e is None or e == s for e, s in zip(shape, seen))
        if not ok:
            raise invalid_argument(f"{op}: {name} expected shape {shape_str(shape)}, got {shape_str(seen)}")
    if contiguous and not t.is_contiguous():
        raise invalid_argument(f"{op}: {name} must be contiguous (row-major), got strides {tuple(t.stride())}")
    if device is not None and str(t.device) != device:
        raise invalid_argument(f"{op}: {name} expected on device {device}, got {t.device}")


def check_int(op, name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_argument(f"{op}: {name} expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise invalid_argument(f"{op}: {name} must be >= {minimum}, got {value}")


def element_size(t):
    return t.element_size() if hasattr(t, "element_size") else t.itemsize


INDEX_DTYPES = ("int64", "int32")
SCALE_DTYPES = ("float32", "int32")
