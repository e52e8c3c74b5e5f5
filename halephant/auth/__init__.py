"""Password exchanges, both ways, sans-IO: clients authenticating to halephant (`server_side`) and
halephant authenticating to PostgreSQL (`upstream`). scramp runs the server side of SCRAM and SASLprep;
the client side is `upstream`'s own, which caches its key derivations and lets its caller run the first
one off the event loop. `passthrough` keeps, in memory, the keys a client's SCRAM login against a
configured verifier gives, for logging in upstream without a plaintext password."""
