"""Per-conv-layer settings of the conv nets' recipes (``kernels``, ``strides``, ``paddings``,
``pools``): one value for every conv layer, or a list with one entry each."""

from __future__ import annotations

from eprun.limits import MAX_KERNEL


class ConvLayerLists:
    """For conv-net configs with ``channels``: settings given once or one entry per conv layer."""

    channels: list[int]

    def per_conv_layer(self, value) -> list:
        """A setting as one entry per conv layer (a single value repeated)."""
        return list(value) if isinstance(value, list) else [value] * len(self.channels)

    def check_conv_lists(self, lowest: dict[str, tuple], pools=None):
        """(key, message) for a list whose length is not the number of conv layers, or an entry
        below its lowest allowed value; ``lowest`` maps each key to (its value, the lowest
        allowed), ``pools`` is the ``pools`` value (lengths checked only)."""
        n = len(self.channels)
        lengths = {name: self.per_conv_layer(value) for name, (value, _) in lowest.items()}
        if pools is not None:
            lengths["pools"] = self.per_conv_layer(pools)
        for name, values in lengths.items():
            if len(values) != n:
                yield name, f"one entry per conv layer ({n} for channels={self.channels}) or a single value, got {len(values)}"
            elif name in lowest:
                for v in values:
                    if not lowest[name][1] <= v <= MAX_KERNEL:
                        yield name, f"must be between {lowest[name][1]} and {MAX_KERNEL}, got {v}"
