"""Argument checks done in Python before anything reaches the core (no GPU needed to run them).

They work on anything tensor-like (``shape``, ``dtype``, ``device``, ``is_contiguous()``), which is what lets the
CPU tests exercise them without PyTorch. Every failure is an OpenEPError(code="invalid_argument") whose message
names the operation, the argument, what was expected and what was seen.
"""

from .errors import invalid_argument


_DTYPE_NAMES = {}  # dtype object -> name without the "torch." prefix (str() of a dtype costs ~0.3 us per call)


def dtype_name(dtype):
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        s = str(dtype)
        name = s[len("torch."):] if s.startswith("torch.") else s
        try:
            _DTYPE_NAMES[dtype] = name
        except TypeError:  # an unhashable dtype-like object: no caching
            pass
    return name


def shape_str(shape):
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"


def _shape_matches(seen, shape):
    if len(seen) != len(shape):
        return False
    for e, s in zip(shape, seen):
        if e is not None and e != s:
            return False
    return True


def check_tensor(op, name, t, dtypes=None, shape=None, contiguous=False, device=None):
    """Checks one tensor argument (on every call of the hot path: kept cheap, ~1-2 us).

    Args:
        op: operation name for the message (e.g. "dispatch").
        name: argument name.
        dtypes: allowed dtype names (e.g. ("bfloat16",)), or None for any.
        shape: expected shape, None entries match any size (its length fixes the number of dimensions).
        contiguous: require a contiguous (row-major) tensor.
        device: expected device: a ``torch.device`` (compared with ==) or a device string (e.g. "cuda:0").
    """
    try:
        seen_shape, dtype, seen_device = t.shape, t.dtype, t.device
    except AttributeError:
        raise invalid_argument(f"{op}: {name} expected a tensor, got {type(t).__name__}") from None
    if dtypes is not None and dtype_name(dtype) not in dtypes:
        raise invalid_argument(f"{op}: {name} expected dtype {' or '.join(dtypes)}, got {dtype_name(dtype)}")
    if shape is not None and not _shape_matches(seen_shape, shape):
        raise invalid_argument(f"{op}: {name} expected shape {shape_str(shape)}, got {shape_str(tuple(seen_shape))}")
    if contiguous and not t.is_contiguous():
        raise invalid_argument(f"{op}: {name} must be contiguous (row-major), got strides {tuple(t.stride())}")
    if device is not None and seen_device != device and str(seen_device) != str(device):
        raise invalid_argument(f"{op}: {name} expected on device {device}, got {seen_device}")


def check_int(op, name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_argument(f"{op}: {name} expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise invalid_argument(f"{op}: {name} must be >= {minimum}, got {value}")


def element_size(t):
    return t.element_size() if hasattr(t, "element_size") else t.itemsize


INDEX_DTYPES = ("int64", "int32")
SCALE_DTYPES = ("float32", "int32")
