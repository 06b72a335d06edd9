"""A backend with one operator made wrong, for the tests of ``python -m fused_preact.check`` and of
the units' first-use check: ``make_wrong(monkeypatch, ...)`` swaps the registered backend's operator
namespace (in dispatch and in the unit operators' operator sets) for one whose ``operator`` scales its first output by 1.01 for activations of ``dtypes``."""
from __future__ import annotations

import dataclasses

import torch

from fused_preact import dispatch, unit_function


class WrongOps:
    """``real``'s operators, ``operator`` off by 1% in its first output for ``dtypes`` (all when None)."""

    def __init__(self, real, operator: str, dtypes=None):
        self.real, self.operator, self.dtypes = real, operator, dtypes
        self.calls = 0

    def __getattr__(self, name):
        function = getattr(self.real, name)
        if name != self.operator:
            return function

        def wrong(*args, **kwargs):
            self.calls += 1
            out = function(*args, **kwargs)
            first = out[0] if isinstance(out, tuple) else out
            if self.dtypes is None or first.dtype in self.dtypes:
                first = first * 1.01
            return (first, *out[1:]) if isinstance(out, tuple) else first
        return wrong


def make_wrong(monkeypatch, backend: str = "cuda", operator: str = "conv_bnrelu", dtypes=None) -> WrongOps:
    registered = dispatch._registry[backend]
    wrong = WrongOps(registered.ops(), operator, dtypes)
    monkeypatch.setitem(dispatch._registry, backend, dataclasses.replace(registered, ops=lambda: wrong))
    # the unit operators take their backend's operators by name, from unit_function's operator sets
    monkeypatch.setitem(unit_function._OPERATOR_SETS, backend, lambda: wrong)
    return wrong
