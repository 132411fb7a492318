"""Edge role: exports LUNs over iSCSI, keeps writes in a blockstore, ships them to the Core."""
