"""The errors of jax_garden.weights besides the standard ones."""

from __future__ import annotations

from jax_garden._service.mailbox import PeerDead  # noqa: F401  (re-exported: a peer found dead)


class VersionRefused(RuntimeError):
    """A pushed version will never go into service at some subscriber rank (the message says which
    and why: e.g. a newer version replaced it before it was complete)."""
