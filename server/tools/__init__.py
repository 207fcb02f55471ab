"""Client-side tools that talk to a server over HTTP (the load generator)."""
