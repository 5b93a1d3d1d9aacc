"""Engines and entry points: the same ordered stage list wired onto Ray Data and onto Apache Beam."""
