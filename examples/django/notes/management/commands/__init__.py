"""`routing_demo`."""
