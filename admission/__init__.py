"""admission package: the engine, leases, policy, identity, cache, flusher.

Importing it first decides which build of the hot-path modules runs (admission.native).
"""

from admission import native as _native

_native.install()
