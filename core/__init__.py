"""Core role: serves LUNs to Edges, applies writes, mirrors them to the peer Core."""
