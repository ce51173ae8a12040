"""Bakong: the async client, the KHQR codec and the simulated Bakong."""
