"""Storage types behind one interface (base.StoredType): SliM's mixed-width types
(format.py, docs/FORMAT.md) and the stock ggml types (base.NativeType), one module per family."""

from __future__ import annotations

from .. import format as fmt
from .base import BlockParams, NativeType, StoredType
from .iquants import IQ4_NL, IQ4_XS
from .kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from .lattice import IQ2_S, IQ2_XS, IQ2_XXS, IQ3_S, IQ3_XXS
from .legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0

NATIVE_TYPES: dict[str, NativeType] = {
    t.name.lower(): t
    for t in (Q8_0(), Q6_K(), Q5_K(), Q4_K(), Q3_K(), Q2_K(), Q5_1(), Q5_0(), Q4_1(), Q4_0(), IQ4_NL(), IQ4_XS())
    + (IQ3_S(), IQ3_XXS(), IQ2_S(), IQ2_XS(), IQ2_XXS())
}


# What a type falls back to for a weight whose rows its blocks do not divide, as llama-quantize.
FALLBACK = {
    **{name: "iq4_nl" for name in ("q2_k", "q3_k", "iq4_xs", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs")},
    **{"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"},
}


def native_type(name: str) -> NativeType:
    """The stock type called ``name`` (any case), or a one-line error naming the choices."""
    try:
        return NATIVE_TYPES[name.lower()]
    except KeyError:
        raise ValueError(f"native type must be one of {', '.join(NATIVE_TYPES)}, got {name!r}") from None


_BY_GGML_TYPE = {t.ggml_type: t for t in NATIVE_TYPES.values()}


def type_from_ggml(type_id: int) -> NativeType | None:
    """The stock type with this ggml type id, or None for any other id (as format.type_from_id)."""
    return _BY_GGML_TYPE.get(int(type_id))


def stored_type(type_id: int) -> StoredType | None:
    """The SliM or stock type with this ggml type id; None for float and unsupported types."""
    return fmt.type_from_id(type_id) or type_from_ggml(type_id)


def type_for(name: str, n_cols: int) -> NativeType:
    """The type a weight of ``n_cols`` columns is stored in when ``name`` is asked for:
    ``name`` itself, or its 32-wide fallback where its 256-wide blocks do not divide the rows."""
    stype = native_type(name)
    if n_cols % stype.block_size and name.lower() in FALLBACK:
        stype = native_type(FALLBACK[name.lower()])
    if n_cols % stype.block_size:
        raise ValueError(f"{stype.name} stores rows in blocks of {stype.block_size}; a weight has {n_cols} columns")
    return stype


__all__ = ["FALLBACK", "NATIVE_TYPES", "BlockParams", "NativeType", "StoredType", "native_type", "stored_type", "type_for", "type_from_ggml"]
