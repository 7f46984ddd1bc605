"""Checks of the public arguments that several modules share; each error names the argument.

Integers are anything `numbers.Integral` and reals anything `numbers.Real` (numpy's scalars
included, as torch's own factories accept them), bool excepted; the checks return plain Python
ints and floats, so that what reaches the backends and torch.compile's guards is always one.
Plain ints and floats take the first branch; dynamo traces a numpy scalar as an array, which
the later branches refuse with a hint (see `_traced_numpy_hint`).
"""

from __future__ import annotations

import numbers

import torch


def as_int(name: str, value, what: str = "an int") -> int:
    """`value` as a Python int; TypeError naming `name` for anything else (bool included)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"{name} must be {what}, got {type(value).__name__}{_traced_numpy_hint()}")


def as_real(name: str, value) -> float:
    """`value` as a Python float (NaN and Inf pass: the caller bounds it)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a real number, got {type(value).__name__}"
                    f"{_traced_numpy_hint()}")


def _traced_numpy_hint() -> str:
    # Dynamo traces a numpy scalar as a torch-backed ndarray that is no numbers.Integral/Real;
    # without fullgraph=True it falls back to eager here, where the scalar is accepted.
    if not torch.compiler.is_compiling():
        return ""
    return (" (under torch.compile a numpy scalar is traced as an array: pass a Python number, "
            "int(...) or float(...))")


def check_floating_tensor(name: str, value, axes: tuple[str, ...]) -> None:
    """`value` must be a dense floating-point tensor with one dimension per name in `axes`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got {value.dtype}")
    check_dense(name, value)
    if value.dim() != len(axes):
        raise ValueError(f"{name} must be {len(axes)}-D ({', '.join(axes)}), got shape "
                         f"{tuple(value.shape)}")


def check_dense(name: str, tensor: torch.Tensor) -> None:
    """The backends read strided memory: sparse, MKL-DNN and nested tensors are refused."""
    if tensor.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor; "
                        f"concatenate its rows")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {tensor.layout}; "
                        f"convert it with .to_dense()")
