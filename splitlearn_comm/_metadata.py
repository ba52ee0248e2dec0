"""gRPC metadata as the package takes it (internal): one checker for the client's
metadata and for the trailing metadata a server sets."""
from __future__ import annotations

import re
from typing import List, Mapping, Sequence, Tuple, Union

MetadataLike = Union[None, Mapping[str, Union[str, bytes]], Sequence[Tuple[str, Union[str, bytes]]]]

#: The metadata key a client's training calls carry its client id under (the
#: server's activation store keys forwards by it; splitlearn_comm.training).
CLIENT_ID_KEY = "sl-client-id"

_KEY = re.compile(r"^[0-9a-z_.\-]+$")


def normalize(md: MetadataLike) -> List[Tuple[str, Union[str, bytes]]]:
    if md is None:
        return []
    items = list(md.items()) if isinstance(md, Mapping) else list(md)
    out = []
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError(f"metadata items must be (key, value) tuples, got {item!r}")
        key, value = item
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(f"invalid metadata key {key!r}: keys are lowercase ASCII letters, "
                             "digits, '-', '_' and '.'")
        if key.endswith("-bin"):
            if not isinstance(value, (bytes, str)):
                raise TypeError(f"metadata value for {key!r} must be bytes")
        elif not isinstance(value, str) or not value.isascii() or not value.isprintable():
            raise ValueError(f"metadata value for {key!r} must be printable ASCII text "
                             "(use a key ending in '-bin' for binary values)")
        out.append((key, value))
    return out
