"""steelfusion: block-level synchronous replication appliance emulator.

Roles live in their own packages (``edge``, ``core``, ``witness``, ``journal``);
this package holds what they share: the node wire protocol, the iSCSI codec,
configuration, logging, the CLIs and the lab.
"""

__version__ = "0.1.0"
