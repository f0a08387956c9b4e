"""Arrays from other libraries in, the same kind out; arguments in the user's words.

torch is never imported here unless the caller passed a torch tensor (then it
is already imported). Everything numbarope computes stays numpy inside.

* torch CPU tensors are read without a copy where numpy can view them
  (float32/float64); float16 and bfloat16 are widened exactly to float32 and
  computed as float32 inputs are (float32 accumulation, float64 where the logits
  need it, as torch computes them in float32), and the result is returned in the
  input dtype with its rounding (``2⁻¹¹`` or ``2⁻⁸`` times max|V|) added to
  ``info.error_bound``;
  tensors on another device are refused (numbarope computes on the CPU).
  Tensors that require grad (grad mode on) get a differentiable result
  (:mod:`numbarope._pipeline.grad`).
* Other objects with ``__dlpack__`` go through ``np.from_dlpack``; anything
  else through ``np.asarray`` (``__array__``).
"""

import difflib

import numpy as np

__all__ = ["to_numpy", "is_torch", "is_dask", "output_like", "requires_grad",
           "unexpected_keywords"]

#: Unit roundoff of low-precision dtypes that numbarope accepts from torch.
LOW_PRECISION_UNIT = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def is_torch(x):
    """True for a torch tensor (checked without importing torch)."""
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def is_dask(*xs):
    """True if any argument is a dask collection (checked without importing dask)."""
    for x in xs:
        if x is not None and hasattr(x, "__dask_graph__") and \
                type(x).__module__.split(".")[0] == "dask":
            return True
    return False


def _torch_dtype_name(t):
    return str(t.dtype).replace("torch.", "")


def to_numpy(x, name, allow_int=False):
    """``(array, low_unit, torch_dtype)``: a numpy view/copy of x, the unit roundoff of a
    low-precision input (0.0 otherwise) and the torch dtype name (None for non-torch).

    Raises
    ------
    ValueError
        A torch tensor on a device other than the CPU.
    TypeError
        A torch tensor of a dtype numbarope does not compute with (the message gives
        the torch way to convert it).
    """
    if x is None or isinstance(x, np.ndarray):
        return x, 0.0, None
    if is_torch(x):
        dev = getattr(getattr(x, "device", None), "type", "cpu")
        if dev != "cpu":
            raise ValueError(f"{name} is a torch tensor on device '{x.device}'; numbarope "
                             f"computes on the CPU: pass {name}.cpu()")
        dt = _torch_dtype_name(x)
        t = x.detach()
        if t.is_conj() if hasattr(t, "is_conj") else False:
            t = t.resolve_conj()
        if t.is_neg() if hasattr(t, "is_neg") else False:     # a lazily negated view
            t = t.resolve_neg()
        if dt in LOW_PRECISION_UNIT:
            import torch
            return t.to(torch.float32).numpy(), LOW_PRECISION_UNIT[dt], dt
        if dt in ("float32", "float64", "bool") or (
                allow_int and dt in ("int8", "int16", "int32", "int64", "uint8")):
            return t.numpy(), 0.0, dt
        advice = f"{name}.float()" if not dt.startswith("complex") else f"{name}.real.float()"
        raise TypeError(f"{name} is a torch tensor of dtype torch.{dt}; numbarope computes "
                        f"with float32/float64 (float16 and bfloat16 are widened): "
                        f"pass {advice}")
    if hasattr(x, "__dlpack__") and not hasattr(x, "__array__"):
        try:
            return np.from_dlpack(x), 0.0, None
        except (TypeError, BufferError, RuntimeError) as exc:
            raise TypeError(f"{name} could not be read through DLPack ({exc}); pass a "
                            f"numpy array") from None
    return x, 0.0, None


def requires_grad(*xs):
    """True when a torch input requires grad and grad mode is on."""
    if not any(is_torch(x) and x.requires_grad for x in xs):
        return False
    import torch
    return torch.is_grad_enabled()


def output_like(out, torch_dtypes):
    """Return ``out`` as a torch tensor of the promoted input dtype if any input was one
    (without autograd: :mod:`numbarope._pipeline.grad` makes results differentiable)."""
    names = [d for d in torch_dtypes if d is not None]
    if not names:
        return out
    import torch
    if len(names) == 1 and names[0] == out.dtype.name and \
            out.flags.c_contiguous:
        return torch.from_numpy(out)         # the common case, without conversions
    dt = getattr(torch, names[0])
    for d in names[1:]:
        dt = torch.promote_types(dt, getattr(torch, d))
    if dt == torch.bool:                     # only a boolean bias was a tensor
        dt = torch.from_numpy(np.empty(0, out.dtype)).dtype
    return torch.from_numpy(np.ascontiguousarray(out)).to(dt)


#: Names users bring from torch SDPA, flash-attn and transformers, and what to pass.
_ALIASES = {
    "attn_mask": "bias= (a boolean mask, True = take part, or an additive float mask "
                 "of shape (..., 2n-1) over offsets t = i - j)",
    "attention_mask": "bias= (a boolean mask, True = take part, or an additive float "
                      "mask of shape (..., 2n-1) over offsets t = i - j)",
    "mask": "bias= (boolean mask, True = take part)",
    "causal": "is_causal=",
    "softmax_scale": "scale=",
    "sm_scale": "scale=",
    "rope_theta": "rotary=numbarope.Rotary(base=...)",
    "rope_base": "rotary=numbarope.Rotary(base=...)",
    "base": "rotary=numbarope.Rotary(base=...)",
    "rotary_dim": "rotary=numbarope.Rotary(dim=...)",
    "position_ids": "positions= (key positions for the rotary embedding, (..., S))",
    "key_padding": "key_padding_mask= ((..., S) bool, True = real token)",
    "padding_mask": "key_padding_mask= ((..., S) bool, True = real token)",
    "dropout_p": "nothing: numbarope computes attention without dropout (inference)",
    "dropout": "nothing: numbarope computes attention without dropout (inference)",
    "num_threads": "workers=",
    "n_jobs": "workers=",
    "threads": "workers=",
    "dtype": "precision= ('float32' or 'float64')",
}


def unexpected_keywords(func, kwargs, known):
    """TypeError for unknown keyword arguments, with the right name where we know it."""
    parts = []
    for k in kwargs:
        if k in _ALIASES:
            parts.append(f"'{k}' (use {_ALIASES[k]})")
        else:
            close = difflib.get_close_matches(k, known, n=1, cutoff=0.6)
            parts.append(f"'{k}'" + (f" (did you mean {close[0]}=?)" if close else ""))
    return TypeError(f"{func}() got unexpected keyword argument(s) {', '.join(parts)}")
