"""`kvserve bench`: an open-loop load generator, in-process or against a running server."""
