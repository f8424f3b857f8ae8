"""Synthetic tasks with verifiable answers and their rule-based reward functions."""
