"""What differs between the transformers releases this package supports, decided once here.

transformers 5.24 renamed the cache argument of models and of their output classes from `past_key_values` to
`cache`, and `generate()` now hands the cache to `forward` as `cache=`; 5.23 and older use `past_key_values`
everywhere. The models here accept both names on every release (the same object under either name) and put the
cache in their outputs, and in `generate()`'s model kwargs, under the name the installed release uses, so that no
deprecation warning is printed in normal use.
"""

from __future__ import annotations

import dataclasses

from transformers.modeling_outputs import BaseModelOutputWithPast

#: The name of the cache in model outputs and in `generate()`'s model kwargs on the installed transformers:
#: `"cache"` from 5.24 on, `"past_key_values"` before.
CACHE_NAME = ("cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
              else "past_key_values")


def resolve_cache(cache=None, past_key_values=None):
    """The cache a caller passed, under either name (`cache`, or the older `past_key_values`). Two different
    objects are an error: which one should the model continue from?"""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError(
            "Got both `cache` and `past_key_values`, and they are different objects. They are two names for the "
            "same argument (`cache` from transformers 5.24 on, `past_key_values` before): pass the cache once."
        )
    return cache if cache is not None else past_key_values


def cache_of(outputs):
    """The cache held by a model output (or `generate()` kwargs dict) of the installed release, or None."""
    if isinstance(outputs, dict):
        return outputs.get(CACHE_NAME)
    return getattr(outputs, CACHE_NAME, None)


def output_fields(cache) -> dict:
    """Keyword arguments that put `cache` into an output class of the installed release."""
    return {CACHE_NAME: cache}


__all__ = ["CACHE_NAME", "resolve_cache", "cache_of", "output_fields"]
