"""Discrete-event model of a P/D service, driving the coordinator's own policy and placement code."""
