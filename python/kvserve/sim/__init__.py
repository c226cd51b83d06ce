"""Capacity planning: calibrate a step-time model, simulate fleets on the real core, plan."""
