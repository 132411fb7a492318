"""Witness role: approves replication suspension for at most one Core of a pair."""
