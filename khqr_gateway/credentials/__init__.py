"""Bakong credentials: the model, their store and token renewal."""
