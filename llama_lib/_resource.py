"""Base of the objects that own one C pointer and must free it exactly once."""

from __future__ import annotations


class OwnedPointer:
    """Owns `ptr`, freed once by `_free` on close(), at the end of a `with` block, or when
    garbage collected. Subclasses set `_free` before `ptr`; holding the C function on the
    instance keeps __del__ working during interpreter shutdown."""

    ptr = None
    _free = None

    def close(self) -> None:
        """Free the C object (idempotent)."""
        ptr, self.ptr = self.ptr, None
        if ptr and self._free is not None:
            self._free(ptr)

    def __del__(self) -> None:
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
