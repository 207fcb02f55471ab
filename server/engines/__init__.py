"""Engines behind one narrow interface."""
